"""`python -m worker` exit codes and start-up errors: bad configuration exits 2 with what to change before
the model loads, a stop while Redis is unreachable exits 0, misspelt settings are named, and /metrics
binds the configured address."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import REPO_ROOT, wait_until, worker_env
from worker import preflight
from worker.settings import unknown_env_names


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def no_worker_built(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`worker.app.Worker` replaced by one that fails the test: the checks must stop main() before it."""
    import worker.app

    class NotToBeBuilt:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("the worker (and its model) was built despite a bad setting")

    monkeypatch.setattr(worker.app, "Worker", NotToBeBuilt)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def _main_with(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> int:
    from worker.__main__ import main

    for key, value in env.items():
        if key.startswith("TOKENRELAY_"):
            monkeypatch.setenv(key, value)
    return main([])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_cuda_device_without_cuda_exits_2_before_loading(
        monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, model_dir: Path, no_worker_built: None,
        capfd: pytest.CaptureFixture[str]) -> None:
    assert _main_with(monkeypatch, worker_env(redis_server.url, model_dir, device="cuda")) == 2
    err = capfd.readouterr().err
    assert "TOKENRELAY_DEVICE=cuda" in err and "TOKENRELAY_DEVICE=cpu" in err
    assert "Traceback" not in err


def test_device_problems_name_the_fix() -> None:
    assert preflight.device_problem("cpu") is None
    assert "not a device" in (preflight.device_problem("gpu") or "")
    assert "not a device" in (preflight.device_problem("cuda:x") or "")
    if not torch.cuda.is_available():
        assert "TOKENRELAY_DEVICE=cpu" in (preflight.device_problem("cuda:0") or "")
    else:
        assert "GPU(s) are visible" in (preflight.device_problem(f"cuda:{torch.cuda.device_count()}") or "")


def test_a_taken_metrics_port_exits_2_before_loading(
        monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer, model_dir: Path, no_worker_built: None,
        capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as squatter:  # e.g. the first worker on this host
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        code = _main_with(monkeypatch, worker_env(redis_server.url, model_dir, metrics_port=port))
    assert code == 2
    err = capfd.readouterr().err
    assert f"127.0.0.1:{port} is already in use" in err and "TOKENRELAY_METRICS_PORT" in err


def test_sigterm_while_redis_is_unreachable_at_start_exits_0(model_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=REPO_ROOT, stdout=log, stderr=log,
            env=worker_env(f"redis://127.0.0.1:{_free_port()}/0", model_dir, socket_timeout_s=5))
        try:
            wait_until(lambda: "Redis unreachable" in log_path.read_text(), timeout_s=120,
                       what="the startup retrying Redis")
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, log_path.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    assert "Traceback" not in log_path.read_text()


def test_unknown_tokenrelay_variables_are_named_with_the_likely_setting(redis_server: RedisServer) -> None:
    env = worker_env(redis_server.url, None, max_modle_len=512)  # a typo of max_model_len
    env["TOKENRELAY_FUSED_KERNELS"] = "0"  # read by the engine, not a WorkerSettings field
    result = subprocess.run([sys.executable, "-m", "worker", "--check"], cwd=REPO_ROOT, env=env, text=True,
                            capture_output=True, timeout=60)
    assert "unknown setting TOKENRELAY_MAX_MODLE_LEN is ignored (did you mean TOKENRELAY_MAX_MODEL_LEN?)" in result.stderr
    assert "TOKENRELAY_FUSED_KERNELS" not in result.stderr
    assert unknown_env_names({"TOKENRELAY_COMPLETELY_ELSE": "1", "HOME": "/"}) == [("TOKENRELAY_COMPLETELY_ELSE", None)]


def test_metrics_bind_the_configured_address_only() -> None:
    from worker.metrics import Metrics, MetricsPortError

    port = _free_port()
    metrics = Metrics()
    metrics.serve(port, "127.0.0.2")  # a second loopback address: only it must answer
    try:
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as reply:
            assert b"tokenrelay_queue_lag" in reply.read()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        with pytest.raises(MetricsPortError, match="TOKENRELAY_METRICS_PORT"):
            Metrics().serve(port, "127.0.0.2")
    finally:
        metrics.close()
