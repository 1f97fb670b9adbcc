"""Fixtures for the gateway tests: one real redis-server, one real worker subprocess and real gateways
(`python -m api_client.gateway` under uvicorn on free loopback ports) per session, and the official
`openai` client pointed at them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_client import Client, JobFailed
from engine.model_files import EMBEDDED_MODEL
from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import PREFIX, REPO_ROOT, spawn_worker

API_KEY = "sk-test-team-a"
API_KEYS = f"team-a={API_KEY},sk-test-bare"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def served_model_name() -> str:
    """The worker serves the embedded real chat model (TOKENRELAY_MODEL unset), under its own name."""
    return EMBEDDED_MODEL


@pytest.fixture(scope="session")
def reference() -> Callable[[str, dict[str, Any]], tuple[list[int], str]]:
    """LLMEngine.generate on one prompt: (token_ids, text), what the worker must produce greedily."""
    from engine import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=None, num_kv_blocks=64, max_num_seqs=4,
                                    max_num_batched_tokens=512, max_model_len=512))

    def generate(prompt: str, params: dict[str, Any]) -> tuple[list[int], str]:
        out = engine.generate([prompt], SamplingParams(**params))[0]
        return out.token_ids, out.text

    return generate


@pytest.fixture(scope="session")
def gateway_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def gateway_worker(gateway_redis: RedisServer,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("gateway_worker") / "worker.log"
    proc = spawn_worker(gateway_redis.url, None, log_path=log, consumer="gw-worker",
                        max_model_len=512, cancel_check_ms=20,
                        max_num_seqs=24, num_kv_blocks=512)
    # Serving, not just claimed (the heartbeat is there while the model loads): one job through it.
    with Client(gateway_redis.url, prefix=PREFIX) as client:
        try:
            client.result(client.submit("Hi", max_tokens=1), timeout=START_TIMEOUT_S)
        except (TimeoutError, JobFailed) as exc:
            raise AssertionError(f"the worker did not start ({exc!r}):\n{log.read_text()[-3000:]}") from None
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Gateway:
    """A `python -m api_client.gateway` subprocess on a free loopback port."""

    def __init__(self, redis_url: str, log_path: Path, **settings: Any) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
        values = {"redis_url": redis_url, "prefix": PREFIX, "gateway_host": "127.0.0.1",
                  "gateway_port": self.port, **settings}
        env.update({f"TOKENRELAY_{k.upper()}": str(v) for k, v in values.items()})
        env["PYTHONPATH"] = str(REPO_ROOT)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "api_client.gateway", "--log-level", "info"],
                                        cwd=REPO_ROOT, env=env, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not start:\n{self.log()}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture(scope="session")
def start_gateway(gateway_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Callable[..., Gateway]]:
    gateways: list[Gateway] = []

    def start(**settings: Any) -> Gateway:
        settings.setdefault("redis_url", gateway_redis.url)
        log = tmp_path_factory.mktemp("gateway") / "gateway.log"
        gateway = Gateway(log_path=log, **settings)
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        gateway.stop()


@pytest.fixture(scope="session")
def gateway(gateway_worker: subprocess.Popen[bytes], start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway(gateway_api_keys=API_KEYS)


@pytest.fixture(scope="session")
def openai_client(gateway: Gateway) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
