"""The README's `openai` example runs as written against a real gateway and worker."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from tests.gateway.conftest import Gateway
from tests.worker.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
URL = "http://127.0.0.1:8000/v1"


def test_the_readme_openai_example_runs(gateway_worker: Any, start_gateway: Callable[..., Gateway]) -> None:
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", README, re.S | re.M) if "from openai import" in b]
    assert len(blocks) == 1 and URL in blocks[0]
    gateway = start_gateway()  # no key: a loopback client needs none
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", blocks[0].replace(URL, f"{gateway.url}/v1")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *streamed, city = proc.stdout.rstrip("\n").split("\n")
    assert "".join(streamed).strip()  # the streamed answer
    parsed = ast.literal_eval(city)  # the example prints the parsed JSON
    assert set(parsed) == {"name", "country", "population_millions"} and parsed["country"] in (
        "France", "Italy", "Spain")
