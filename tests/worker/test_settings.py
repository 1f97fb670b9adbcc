"""WorkerSettings from TOKENRELAY_* variables, their validation, and the `python -m worker` CLI surface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import REPO_ROOT, worker_env
from worker.settings import WorkerSettings


def test_env_vars_fill_settings_and_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"REDIS_URL": "rediss://app:s3cret@redis.example:6380/2", "MODEL": "/models/qwen",
                        "PREFIX": "tr", "CONSUMER": "gpu-0", "LEASE_S": "12.5", "MAX_NUM_SEQS": "8",
                        "MAX_NUM_BATCHED_TOKENS": "64", "SCHEDULING_POLICY": "priority",
                        "ENABLE_PREFIX_CACHING": "false", "MAX_MODEL_LEN": "512", "METRICS_PORT": "0"}.items():
        monkeypatch.setenv(f"TOKENRELAY_{name}", value)
    settings = WorkerSettings()
    assert settings.redis_url.startswith("rediss://app:s3cret@") and settings.lease_ms == 12500
    assert settings.keys.jobs == "tr:jobs" and settings.consumer == "gpu-0"
    config = settings.to_engine_config()
    assert (config.model, config.max_num_seqs, config.max_num_batched_tokens) == ("/models/qwen", 8, 64)
    assert config.scheduling_policy == "priority" and config.enable_prefix_caching is False
    assert config.max_model_len == 512


def test_defaults_work_and_consumer_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    for key in list(__import__("os").environ):
        if key.startswith("TOKENRELAY_"):
            monkeypatch.delenv(key)
    settings = WorkerSettings()
    assert settings.consumer == socket.gethostname()
    assert settings.block_ms / 1000 < settings.socket_timeout_s / 2
    # No model named: the engine serves the embedded default (SmolLM2-135M-Instruct).
    assert settings.model is None and settings.to_engine_config().model is None


@pytest.mark.parametrize("overrides, match", [
    ({"block_ms": 6000, "socket_timeout_s": 10}, "block_ms"),
    ({"redis_url": "http://localhost:6379"}, "redis://"),
    ({"prefix": "has space"}, "prefix"),
    ({"lease_s": 0}, "lease_s"),
    ({"metrics_port": 70000}, "metrics_port"),
])
def test_bad_settings_are_refused_with_the_field_named(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        WorkerSettings(**overrides)  # type: ignore[arg-type]


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=120)


def test_help_lists_every_setting_with_default_and_description() -> None:
    result = run_cli("--help", env=worker_env("redis://localhost:1/0", None))
    assert result.returncode == 0
    for name, field in WorkerSettings.model_fields.items():
        assert f"TOKENRELAY_{name.upper()}" in result.stdout
        assert field.description and field.description in result.stdout
    assert "default 30.0" in result.stdout  # lease_s


def test_a_missing_model_path_exits_2_in_one_line_of_ours() -> None:
    result = run_cli("--log-level", "WARNING", env=worker_env("redis://localhost:1/0", Path("/models/Qwen3-0.6B")))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cannot start the engine: model '/models/Qwen3-0.6B': no such file or directory"]


def test_an_unreachable_hub_id_exits_2_in_one_line_without_retries() -> None:
    env = worker_env("redis://localhost:1/0", Path("tokenrelay-tests/no-such-model"))
    env["HF_HUB_OFFLINE"] = "1"  # no hub here either way; offline fails at once instead of timing out
    result = run_cli("--log-level", "WARNING", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not be downloaded from the Hugging Face hub" in lines[0], lines


def test_check_fails_without_a_heartbeat_and_passes_with_one(redis_server: RedisServer) -> None:
    env = worker_env(redis_server.url, None)
    result = run_cli("--check", env=env)
    assert result.returncode == 1 and "no live heartbeat for consumer 'w1'" in result.stderr
    redis_server.client().set("trtest:worker:w9", '{"jobs": 0, "time": 0}', ex=30)
    result = run_cli("--check", env=env)  # another worker's heartbeat does not make this one healthy
    assert result.returncode == 1 and "live consumers under this prefix: w9" in result.stderr
    redis_server.client().set("trtest:worker:w1", '{"jobs": 0, "time": 0}', ex=30)
    result = run_cli("--check", env=env)
    assert result.returncode == 0 and result.stdout.startswith("w1: jobs=0")
    result = run_cli("--check", env=worker_env("redis://127.0.0.1:1/0", None, socket_timeout_s=1, block_ms=100))
    assert result.returncode == 1 and "cannot reach Redis" in result.stderr


ENGINE_MODES = pytest.mark.parametrize("engine_process", [False, True], ids=["engine-thread", "engine-process"])


@ENGINE_MODES
def test_wrong_redis_password_exits_2_without_retrying_forever(model_dir: Path, engine_process: bool) -> None:
    with RedisServer() as server:
        server.client().config_set("requirepass", "s3cret")  # from now on, only with the password
        url = server.url.replace("redis://", "redis://:wrong@")
        # With an engine core process, the exit must also end the core (it used to wait on it forever).
        result = subprocess.run([sys.executable, "-m", "worker"], cwd=REPO_ROOT,
                                env=worker_env(url, model_dir, engine_process=engine_process),
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "credentials" in result.stderr
    assert ":wrong@" not in result.stderr + result.stdout  # the password is never echoed


@ENGINE_MODES
def test_sigterm_while_the_model_loads_exits_0(model_dir: Path, redis_server: RedisServer,
                                               engine_process: bool) -> None:
    import signal
    import time

    from tests.worker.conftest import KEYS

    process = subprocess.Popen([sys.executable, "-m", "worker"], cwd=REPO_ROOT,
                               env=worker_env(redis_server.url, model_dir, engine_process=engine_process),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stderr is not None
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the worker says it starts loading the model
        line = process.stderr.readline().decode()
        seen.append(line)
        if "loading model=" in line or not line:
            break
    assert "loading model=" in seen[-1], "".join(seen)[-2000:]
    process.send_signal(signal.SIGTERM)  # the load takes seconds more: it lands while loading
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, ("".join(seen) + stderr.decode())[-2000:]
    assert "worker ready" not in stderr.decode(), "the stop came while loading, and the worker never served"
    # State, beside the log: it never created its consumer group (the first thing it does in Redis).
    assert not redis_server.client().exists(KEYS.jobs)


def test_a_stop_signal_swallowed_while_loading_still_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM lands in library code that swallows the SystemExit (a bare `except:` around an optional
    import): the worker must still stop once the model is loaded, not serve."""
    import contextlib
    import os
    import signal

    import worker.__main__ as main_module
    import worker.app

    shut_down: list[bool] = []

    class FakeEngine:
        def shutdown(self, timeout_s: float = 10.0) -> None:
            shut_down.append(True)

    class LoadingWorker:
        def __init__(self, settings: object, *, burst: bool, **kwargs: object) -> None:
            with contextlib.suppress(BaseException):  # what such library code does
                os.kill(os.getpid(), signal.SIGTERM)  # handled here, in the main thread
            self.engine = FakeEngine()

        async def run(self) -> int:
            raise AssertionError("a worker stopped while loading must not serve")

    monkeypatch.setattr(worker.app, "Worker", LoadingWorker)
    monkeypatch.setattr(main_module, "_signalled_before_serving", False)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert main_module._run(object(), burst=False) == 0  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert shut_down == [True]
