"""README.md and docs/configuration.md checked against the code: the generated settings tables, the engine
table, metric names, the quickstart, and the README's Python and redis-cli examples run against a worker."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from api_client import parse_event
from api_client.gateway.settings import GatewaySettings
from engine.config import EngineConfig
from scripts.gen_config_docs import (
    CONFIG_PAGE,
    END_MARKER,
    GATEWAY_END_MARKER,
    GATEWAY_START_MARKER,
    START_MARKER,
    render_page,
    render_readme,
    render_tables,
    splice,
)
from worker.settings import ENV_PREFIX, WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
CONSOLE_BLOCKS = re.findall(r"^\s*```console\n(.*?)^\s*```", README, re.S | re.M)
DEFAULT_URL = "redis://localhost:6379/0"


def section(title: str) -> str:
    """README text from the heading `title` to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, re.M)
    assert match, f"README has no heading {title!r}"
    level = len(match.group(1))
    rest = README[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


def table_rows(text: str) -> list[list[str]]:
    """Cells of the markdown table rows in `text`, header and separator rows left out."""
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in text.splitlines() if line.strip().startswith("|")]
    return [row for row in rows if row and not set(row[0]) <= {"-", " "} and row[0] not in ("variable", "knob", "metric")]


# ---- the generated configuration tables ----------------------------------------------------------
def test_readme_config_table_is_current() -> None:
    assert render_readme(README) == README, (
        "README.md's configuration table is stale: run python scripts/gen_config_docs.py")


def test_configuration_page_is_current() -> None:
    assert CONFIG_PAGE.read_text(encoding="utf-8") == render_page(), (
        "docs/configuration.md is stale: run python scripts/gen_config_docs.py")


class _WithNewSetting(WorkerSettings):
    prefill_chunk_tokens: int = Field(default=512, ge=16, description="largest prompt chunk per step")


def test_a_new_setting_makes_the_readme_stale() -> None:
    tables = render_tables(_WithNewSetting)
    assert "| `TOKENRELAY_PREFILL_CHUNK_TOKENS` | `512` | int >= 16 | largest prompt chunk per step |" in tables
    assert splice(README, tables) != README


def test_the_readme_table_lists_every_setting_with_its_default() -> None:
    block = README[README.index(START_MARKER):README.index(END_MARKER)]
    rows = {row[0].strip("`"): row for row in table_rows(block)}
    assert set(rows) == {f"{ENV_PREFIX}{name.upper()}" for name in WorkerSettings.model_fields}
    for name, field in WorkerSettings.model_fields.items():
        default_cell = rows[f"{ENV_PREFIX}{name.upper()}"][1]
        if field.default_factory is None and field.default is not None:
            expected = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
            assert default_cell == f"`{expected}`", f"{name}: {default_cell!r}"
        elif field.default is None:
            assert default_cell == "unset", f"{name}: {default_cell!r}"


def test_the_gateway_table_lists_every_gateway_setting() -> None:
    block = README[README.index(GATEWAY_START_MARKER):README.index(GATEWAY_END_MARKER)]
    rows = {row[0].strip("`"): row for row in table_rows(block)}
    assert set(rows) == {f"{ENV_PREFIX}{name.upper()}" for name in GatewaySettings.model_fields}
    assert "python -m api_client.gateway" in CONFIG_PAGE.read_text(encoding="utf-8")


def test_splice_needs_exactly_one_pair_of_markers() -> None:
    for broken in ("no markers at all", f"{END_MARKER}\n{START_MARKER}",
                   f"{START_MARKER}\n{END_MARKER}\n{START_MARKER}\n{END_MARKER}"):
        with pytest.raises(ValueError, match="config-table"):
            splice(broken, "| a |\n")
    assert splice(f"head\n{START_MARKER}\nold\n{END_MARKER}\ntail", "new\n") == (
        f"head\n{START_MARKER}\nnew\n{END_MARKER}\ntail")


def test_the_check_mode_passes_on_the_committed_files() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- hand-written tables against the code --------------------------------------------------------
def test_the_engine_table_lists_every_engine_config_field() -> None:
    rows = {row[0].strip("`"): row[1] for row in table_rows(section("Engine configuration (`engine.EngineConfig`)"))}
    fields = {field.name: field for field in dataclasses.fields(EngineConfig)}
    assert set(rows) == set(fields), f"missing {set(fields) - set(rows)}, unknown {set(rows) - set(fields)}"
    for name, field in fields.items():
        if field.default is dataclasses.MISSING:
            assert rows[name] == "(required)", name
        else:
            assert ast.literal_eval(rows[name].strip("`")) == field.default, f"{name}: {rows[name]!r}"


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    from api_client.gateway.metrics import GatewayMetrics
    from worker.metrics import Metrics

    exported = {family.name + ("_total" if family.type == "counter" else "")
                for registry in (Metrics().registry, GatewayMetrics().registry) for family in registry.collect()}
    documented = set(re.findall(r"^\s*\| `(tokenrelay_\w+)` \|", README, re.M))
    assert exported == documented


def test_quickstart_is_exactly_two_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", section("Quickstart"), re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash scripts/quickstart.sh", ".venv/bin/python -m pytest"]
    # .ci/run runs the same first command on a fresh clone, so a broken quickstart fails CI.
    assert "bash scripts/quickstart.sh" in (ROOT / ".ci" / "run").read_text()


def test_python_examples_compile_and_their_imports_exist() -> None:
    assert len(PYTHON_BLOCKS) >= 4
    for code in PYTHON_BLOCKS:
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


# ---- the examples, run against a real redis-server and a worker on a tiny model ------------------
@pytest.fixture(scope="module")
def served_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server and an in-process worker (default prefix, Celery door on queue tokenrelay)."""
    from tests.helpers.redis_server import RedisServer
    from tests.helpers.tiny_models import make_tiny_model
    from tests.worker.conftest import InProcessWorker, settings_for

    model = make_tiny_model("qwen3", tmp_path_factory.mktemp("docs_model") / "qwen3")
    with RedisServer() as server:
        worker = InProcessWorker(settings_for(server.url, model, prefix="tokenrelay", max_model_len=512,
                                              celery_queue="tokenrelay", celery_concurrency=4))
        try:
            yield server.url
        finally:
            worker.stop()


def wait_final(client: Any, key: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = client.xrange(key)
        if entries and parse_event(entries[-1][1][b"event"]).is_final:
            return
        time.sleep(0.05)
    raise AssertionError(f"no final event on {key} within {timeout_s} s")


def _run_python(code: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code.replace(DEFAULT_URL, redis_url)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("index", [i for i, code in enumerate(PYTHON_BLOCKS) if "api_client" in code])
def test_python_example_runs(index: int, served_redis: str) -> None:
    proc = _run_python(PYTHON_BLOCKS[index], served_redis)
    assert proc.returncode == 0, f"README python block {index} failed:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), "the example printed nothing"


def test_redis_cli_examples_run(served_redis: str) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    import redis

    from api_client import Keys

    port = served_redis.rsplit(":", 1)[1].split("/")[0]
    commands = [shlex.split(line.strip().removeprefix("$ "), comments=True)
                for block in CONSOLE_BLOCKS for line in block.splitlines() if line.strip().startswith("$ redis-cli")]
    assert len(commands) >= 8
    client = redis.Redis.from_url(served_redis)
    keys = Keys()
    for argv in commands:
        proc = subprocess.run([argv[0], "-p", port, *argv[1:]], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and not proc.stdout.startswith(("ERR", "WRONGTYPE")), (argv, proc.stdout)
        if argv[1] == "XADD":  # the job must be served before the reads that follow it
            wait_final(client, keys.result("demo-1"))
    assert client.get(keys.cancel("demo-1")) == b"1"
    entries: Any = client.xrange(keys.result("demo-1"))
    events = [parse_event(fields[b"event"]) for _id, fields in entries]
    assert [e.type for e in events][-1] == "done" and sum(e.type == "done" for e in events) == 1
    client.close()


# ---- install lines and compose commands ------------------------------------------------------------
def _doc_texts() -> dict[str, str]:
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.md")),
             *sorted((ROOT / "examples").rglob("*.py"))]
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in paths}


def test_install_lines_name_what_this_checkout_can_install() -> None:
    """tokenrelay is not on a package index: its docs install it from the checkout (`.` or `.[extra]`),
    and every extra they name exists."""
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    found = 0
    for name, text in _doc_texts().items():
        for match in re.finditer(r"pip install ([^`\n#]+)", text):
            for spec in shlex.split(match.group(1).strip().rstrip(".,;)")):
                found += 1
                assert not re.match(r"tokenrelay\b", spec), f"{name}: `pip install {spec}` (not published)"
                if spec.startswith(".["):
                    assert set(spec[2:-1].split(",")) <= extras, f"{name}: unknown extra in {spec}"
    assert found >= 3


def test_compose_commands_with_a_profile_name_their_services() -> None:
    """A bare `docker compose --profile X up` also starts every service without a profile (the GPU worker)."""
    commands = [line.split("#")[0].split() for line in README.splitlines() if "docker compose --profile" in line]
    assert len(commands) >= 2
    for words in commands:
        after_up = words[words.index("up") + 1:]
        assert [w for w in after_up if not w.startswith("-")], f"no service named in {' '.join(words)}"
