"""Fixtures and helpers of the reliability suite: real redis-server processes, `python -m worker`
subprocesses on a tiny model, batch greedy references, and readers that check a whole run at once.

The worker tests' helpers (tests/worker/conftest.py) are reused; what is here works on hundreds or
thousands of jobs at a time (pipelined reads, group-level progress) instead of one job at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from api_client.keys import EVENT_FIELD, JOB_FIELD
from api_client.schema import DoneEvent, parse_event
from tests.worker.conftest import (
    KEYS,
    PREFIX,
    assert_contiguous,
    model_dir,
    spawn_worker,
    start_worker,
    wait_until,
)

__all__ = ["KEYS", "PREFIX", "model_dir", "start_worker"]

Reference = Callable[[Sequence[str], dict[str, Any]], list[tuple[list[int], str]]]
PIPELINE_CHUNK = 500  # commands per pipeline when reading thousands of result streams


@pytest.fixture(scope="session")
def reference_batch(model_dir: Path) -> Reference:
    """LLMEngine.generate on many prompts at once (the offline engine, no Redis): [(token_ids, text)]."""
    from engine import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256, max_num_seqs=32,
                                    max_num_batched_tokens=512, max_model_len=256))

    def generate(prompts: Sequence[str], params: dict[str, Any]) -> list[tuple[list[int], str]]:
        outs = engine.generate(list(prompts), SamplingParams(**params))
        return [(out.token_ids, out.text) for out in outs]

    return generate


class WorkerProcess:
    """One `python -m worker` subprocess with a fixed consumer name; kill / restart keep the name, so a
    restarted worker claims its own pending entries once the killed run's heartbeat has expired (at most
    heartbeat_ttl_s; the others wait for lease_s)."""

    def __init__(self, redis_url: str, model: Path, consumer: str, log_dir: Path, args: Sequence[str] = (),
                 **overrides: Any) -> None:
        self.redis_url = redis_url
        self.args = tuple(args)
        self.model = model
        self.consumer = consumer
        self.log_dir = log_dir
        self.overrides = overrides
        self.num_starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.consumer}.{self.num_starts}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.num_starts += 1
        self.process = spawn_worker(self.redis_url, self.model, *self.args, log_path=self.log_path, consumer=self.consumer,
                                    **self.overrides)

    def kill(self) -> None:
        """SIGKILL: no drain, no hand-back, nothing flushed (a crash, an OOM kill)."""
        if self.is_alive:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Stuck: have faulthandler write every thread's stack into the log, then kill.
                self.process.send_signal(signal.SIGUSR2)
                time.sleep(1.0)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def logs(self) -> str:
        parts = []
        for i in range(1, self.num_starts + 1):
            path = self.log_dir / f"{self.consumer}.{i}.log"
            if path.exists():
                parts.append(f"--- {path.name} ---\n" + path.read_text(errors="replace"))
        return "\n".join(parts)


@pytest.fixture
def workers(model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start WorkerProcess objects; every one still alive at the end is stopped."""
    started: list[WorkerProcess] = []

    def start(redis_url: str, consumer: str, args: Sequence[str] = (), **overrides: Any) -> WorkerProcess:
        w = WorkerProcess(redis_url, model_dir, consumer, tmp_path, args, **overrides)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.is_alive:
            w.kill()


def push_jobs(client: Any, jobs: Sequence[dict[str, Any]]) -> list[str]:
    """XADD every job (pipelined); returns the entry ids."""
    ids: list[str] = []
    for start in range(0, len(jobs), PIPELINE_CHUNK):
        pipe = client.pipeline(transaction=False)
        for job in jobs[start:start + PIPELINE_CHUNK]:
            pipe.xadd(KEYS.jobs, {JOB_FIELD: json.dumps(job)})
        ids.extend(i.decode() for i in pipe.execute())
    return ids


def read_results(client: Any, job_ids: Sequence[str]) -> dict[str, list[Any]]:
    """Every job's events, parsed (pipelined XRANGE)."""
    out: dict[str, list[Any]] = {}
    for start in range(0, len(job_ids), PIPELINE_CHUNK):
        chunk = job_ids[start:start + PIPELINE_CHUNK]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.xrange(KEYS.result(job_id))
        for job_id, items in zip(chunk, pipe.execute(), strict=True):
            out[job_id] = [parse_event(fields[EVENT_FIELD.encode()]) for _, fields in items]
    return out


def num_acked(client: Any) -> int:
    """Entries the group has delivered and acknowledged (each job is acked after its final event)."""
    for group in client.xinfo_groups(KEYS.jobs):
        if group["name"] in (KEYS.group, KEYS.group.encode()):
            return int(group["entries-read"] or 0) - int(group["pending"])
    return 0


def num_pending(client: Any, consumer: str | None = None) -> int:
    if consumer is None:
        return int(client.xpending(KEYS.jobs, KEYS.group)["pending"])
    summary = client.xpending(KEYS.jobs, KEYS.group)
    for entry in summary.get("consumers") or []:
        if entry["name"] in (consumer, consumer.encode()):
            return int(entry["pending"])
    return 0


def wait_all_final(client: Any, job_ids: Sequence[str], timeout_s: float,
                   on_timeout: Callable[[], str] = lambda: "") -> dict[str, list[Any]]:
    """Poll until every job's stream ends in a final event; returns the events."""
    deadline = time.monotonic() + timeout_s
    remaining = list(job_ids)
    results: dict[str, list[Any]] = {}
    while remaining:
        fresh = read_results(client, remaining)
        results.update(fresh)
        remaining = [j for j in remaining if not (fresh[j] and fresh[j][-1].is_final)]
        if not remaining:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(remaining)} jobs without a final event after {timeout_s}s "
                                 f"(e.g. {remaining[:5]})\n{on_timeout()[-4000:]}")
        time.sleep(0.2)
    return results


def check_against_reference(results: dict[str, list[Any]], expected: dict[str, tuple[list[int], str]],
                            max_tokens: int) -> None:
    """Exactly one final event, last; indexes contiguous from 0; the done event and the deltas equal the
    offline engine's greedy completion, token for token and character for character."""
    for job_id, evs in results.items():
        tokens = assert_contiguous(evs)
        done = evs[-1]
        assert isinstance(done, DoneEvent), (job_id, done)
        assert done.finish_reason == "length" and len(tokens) == max_tokens, (job_id, done)
        expected_ids, expected_text = expected[job_id]
        assert tokens == expected_ids and done.token_ids == expected_ids, job_id
        assert done.text == expected_text and "".join(e.text for e in evs[:-1]) == expected_text, job_id


def vm_rss_kb(pid: int) -> int | None:
    """The process's resident set (VmRSS of /proc/<pid>/status) in KiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


__all__ += ["WorkerProcess", "check_against_reference", "num_acked", "num_pending", "push_jobs",
            "read_results", "vm_rss_kb", "wait_all_final", "wait_until"]
