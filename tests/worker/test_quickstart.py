"""The README's first command end to end, minus the setup: `python -m worker.quickstart` starts
`python -m worker` with no model configured (the embedded SmolLM2), asks one chat question through a
real redis-server and prints the answer as it streams."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import REPO_ROOT, worker_env


def test_quickstart_streams_a_chat_answer_from_the_embedded_model(redis_server: RedisServer) -> None:
    env = worker_env(redis_server.url, None)
    env = {k: v for k, v in env.items() if k in ("TOKENRELAY_REDIS_URL", "TOKENRELAY_CACHE_DIR")
           or not k.startswith("TOKENRELAY_")}  # nothing else configured, as for a new user
    proc = subprocess.run([sys.executable, "-m", "worker.quickstart"], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "> What is the capital of France?"
    assert "Paris" in proc.stdout and lines[-1].startswith("[done: stop, ")
    assert "It works." in proc.stderr
    # The worker was stopped cleanly and left no job behind.
    client = redis_server.client()
    assert client.xpending("tokenrelay:jobs", "tokenrelay:workers")["pending"] == 0
