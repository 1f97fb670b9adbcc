"""Fixtures for the worker tests: a real redis-server per test, one tiny checkpoint per session, and
helpers to run the worker in this process (asyncio) or as `python -m worker` subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api_client.keys import EVENT_FIELD, JOB_FIELD, Keys
from api_client.schema import parse_event
from tests.helpers.queue_target import PREFIX, QueueTarget, queue_target
from tests.helpers.redis_server import RedisServer, redis_server
from tests.helpers.tiny_models import make_tiny_model

__all__ = ["PREFIX", "QueueTarget", "queue_target", "redis_server"]

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYS = Keys(PREFIX)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny qwen3 checkpoint for every worker test (the worker does not care which family)."""
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("worker_model") / "qwen3")


@pytest.fixture(scope="session")
def reference(model_dir: Path) -> Callable[[str, dict[str, Any]], tuple[list[int], str]]:
    """LLMEngine.generate on one prompt (same engine knobs as the workers): (token_ids, text)."""
    from engine import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128, max_num_seqs=16,
                                    max_num_batched_tokens=512, max_model_len=512))

    def generate(prompt: str, params: dict[str, Any]) -> tuple[list[int], str]:
        out = engine.generate([prompt], SamplingParams(**params))[0]
        return out.token_ids, out.text

    return generate


def worker_env(redis_url: str, model: Path | None, **overrides: Any) -> dict[str, str]:
    """TOKENRELAY_* settings for a small CPU worker; overrides by lower-case setting name."""
    settings: dict[str, Any] = {
        "redis_url": redis_url, "prefix": PREFIX, "consumer": "w1", "device": "cpu",
        "num_kv_blocks": 128, "max_num_seqs": 16, "max_num_batched_tokens": 512, "max_model_len": 256,
        "lease_s": 30, "block_ms": 100, "cancel_check_ms": 20, "heartbeat_ttl_s": 5,
        "metrics_port": 0, "metrics_interval_s": 0.5, "drain_timeout_s": 10,
    }
    if model is not None:
        settings["model"] = str(model)
    settings.update(overrides)
    # The session's model cache (tests/conftest.py) is the one TOKENRELAY_* variable kept.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") or k == "TOKENRELAY_CACHE_DIR"}
    env.update({f"TOKENRELAY_{k.upper()}": str(v) for k, v in settings.items()})
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def settings_for(redis_url: str, model: Path | None, **overrides: Any) -> Any:
    from worker.settings import WorkerSettings

    env = worker_env(redis_url, model, **overrides)
    kwargs: dict[str, Any] = {k.removeprefix("TOKENRELAY_").lower(): v for k, v in env.items() if k.startswith("TOKENRELAY_")}
    return WorkerSettings(**kwargs)


def spawn_worker(redis_url: str, model: Path, *args: str, log_path: Path | None = None,
                 **overrides: Any) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "worker", *args], cwd=REPO_ROOT,
                            env=worker_env(redis_url, model, **overrides), stdout=log, stderr=log)


class InProcessWorker:
    """A Worker running its asyncio loop in a background thread of the test process."""

    def __init__(self, settings: Any, *, burst: bool = False) -> None:
        from worker.app import Worker

        self.loop = asyncio.new_event_loop()
        self.worker = Worker(settings, burst=burst)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.exit_code = self.loop.run_until_complete(self.worker.run())
        except BaseException as exc:
            self.error = exc
            raise

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.worker.request_stop)
        self.join(timeout_s)
        return self.exit_code

    def join(self, timeout_s: float = 60.0) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the worker did not stop in time"
        if self.error is not None:
            raise self.error


@pytest.fixture
def start_worker() -> Iterator[Callable[..., InProcessWorker]]:
    workers: list[InProcessWorker] = []

    def start(settings: Any, *, burst: bool = False) -> InProcessWorker:
        w = InProcessWorker(settings, burst=burst)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


# ---- reading what the worker wrote -------------------------------------------------------------
def submit_raw(client: Any, payload: bytes | str, keys: Keys = KEYS) -> str:
    return client.xadd(keys.jobs, {JOB_FIELD: payload}).decode()


def submit(client: Any, job_id: str, keys: Keys = KEYS, **job: Any) -> str:
    """XADD a job by hand, on its id's shard (as Client.submit, without the marker)."""
    return client.xadd(keys.for_job(job_id).jobs, {JOB_FIELD: json.dumps({"id": job_id, **job})}).decode()


def events(client: Any, job_id: str, keys: Keys = KEYS) -> list[Any]:
    return [parse_event(fields[EVENT_FIELD.encode()]) for _, fields in client.xrange(keys.result(job_id))]


def num_pending(client: Any, keys: Keys = KEYS) -> int:
    """Entries delivered and not acknowledged, over every shard's stream of every lane."""
    return sum(int(client.xpending(stream, keys.group)["pending"]) for shard in keys.shards
               for stream in shard.lane_streams.values() if client.exists(stream))


def wait_final(client: Any, job_id: str, timeout_s: float = 60.0, keys: Keys = KEYS) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        evs = events(client, job_id, keys)
        if evs and evs[-1].is_final:
            return evs
        time.sleep(0.02)
    raise AssertionError(f"no final event for job {job_id} within {timeout_s}s: {events(client, job_id, keys)}")


def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def assert_contiguous(evs: list[Any]) -> list[int]:
    """Token indexes start at 0 with no gap or repeat, exactly one final event, last. Returns tokens."""
    token_ids: list[int] = []
    for ev in evs[:-1]:
        assert ev.type == "token", f"a final event before the end: {evs}"
        assert ev.index == len(token_ids), f"index {ev.index} where {len(token_ids)} was expected"
        token_ids.extend(ev.token_ids)
    assert evs and evs[-1].is_final, "no final event"
    return token_ids


def dead_entries(client: Any, keys: Keys = KEYS) -> list[dict[str, bytes]]:
    return [{k.decode(): v for k, v in fields.items()} for shard in keys.shards
            for _, fields in client.xrange(shard.dead)]


def new_server(**kwargs: Any) -> RedisServer:
    return RedisServer(**kwargs)
