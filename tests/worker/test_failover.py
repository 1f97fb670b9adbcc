"""Real `python -m worker` processes killed or stopped mid-generation: another worker finishes their jobs
and clients see every token exactly once, contiguous, with one final event, equal to greedy LLMEngine."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api_client.keys import Keys
from tests.helpers.queue_target import TARGETS
from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import (
    KEYS,
    InProcessWorker,
    QueueTarget,
    assert_contiguous,
    events,
    num_pending,
    settings_for,
    spawn_worker,
    submit,
    wait_final,
    wait_until,
)

Reference = Callable[[str, dict[str, Any]], tuple[list[int], str]]


def some_tokens_published(client: Any, job_ids: list[str], keys: Keys = KEYS) -> bool:
    return sum(len(events(client, j, keys)) for j in job_ids) >= len(job_ids)


def check_jobs(client: Any, prompts: dict[str, str], params: dict[str, Any], reference: Reference,
               keys: Keys = KEYS) -> None:
    for job_id, prompt in prompts.items():
        evs = wait_final(client, job_id, timeout_s=120, keys=keys)
        tokens = assert_contiguous(evs)
        expected_ids, expected_text = reference(prompt, params)
        done = evs[-1]
        assert done.type == "done" and done.finish_reason == "length", (job_id, done)
        assert tokens == expected_ids and done.token_ids == expected_ids, job_id
        assert done.text == expected_text, job_id


@pytest.mark.parametrize("queue_target", TARGETS, indirect=True)
def test_sigkill_mid_generation_another_worker_finishes(
        queue_target: QueueTarget, model_dir: Path, reference: Reference, tmp_path: Path,
        start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = queue_target.client()
    keys = queue_target.keys
    params = {"max_tokens": 300, "temperature": 0, "ignore_eos": True}
    prompts = {f"k{i}": f"job number {i} says" for i in range(4)}
    first = spawn_worker(queue_target.url, model_dir, log_path=tmp_path / "w1.log", consumer="w1",
                         lease_s=1.0, max_model_len=512, **queue_target.settings)
    try:
        for job_id, prompt in prompts.items():
            submit(client, job_id, keys, prompt=prompt, params=params)
        wait_until(lambda: some_tokens_published(client, list(prompts), keys), timeout_s=120, what="first tokens")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    published = {j: len(events(client, j, keys)) for j in prompts}
    unfinished = [j for j in prompts if not (events(client, j, keys) and events(client, j, keys)[-1].is_final)]
    assert unfinished, "the first worker finished everything before the kill: the test proves nothing"
    second = start_worker(settings_for(queue_target.url, model_dir, consumer="w2", lease_s=1.0,
                                       max_model_len=512, **queue_target.settings))
    check_jobs(client, prompts, params, reference, keys)
    # The second worker generated only what was missing (the rest was resumed from the streams).
    total = params["max_tokens"] * len(prompts)
    assert second.worker.engine.stats().num_generated_tokens < total
    assert sum(published.values()) > 0
    wait_until(lambda: num_pending(client, keys) == 0, what="all acked")


def test_sigterm_hands_running_jobs_back_at_once(
        redis_server: RedisServer, model_dir: Path, reference: Reference, tmp_path: Path,
        start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    params = {"max_tokens": 500, "temperature": 0, "ignore_eos": True}
    prompts = {f"t{i}": f"handing back job {i}" for i in range(3)}
    first = spawn_worker(redis_server.url, model_dir, log_path=tmp_path / "w1.log", consumer="w1",
                         drain_timeout_s=0.2, max_model_len=512, lease_s=600)
    try:
        for job_id, prompt in prompts.items():
            submit(client, job_id, prompt=prompt, params=params)
        wait_until(lambda: some_tokens_published(client, list(prompts)), timeout_s=120, what="first tokens")
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0, (tmp_path / "w1.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    log = (tmp_path / "w1.log").read_text()
    handed_back = [j for j in prompts if f"job={j} event=handback written=True" in log]
    assert handed_back, log[-3000:]
    for job_id in handed_back:
        assert not events(client, job_id)[-1].is_final
    assert client.xpending(KEYS.jobs, KEYS.group)["pending"] == 0  # nothing waits for a lease
    assert client.exists(KEYS.heartbeat("w1")) == 0
    # lease_s=600: only the re-queued entries (not a lease expiry) can bring the jobs to w2.
    start_worker(settings_for(redis_server.url, model_dir, consumer="w2", lease_s=600, max_model_len=512))
    check_jobs(client, prompts, params, reference)


def test_sigterm_lets_running_jobs_finish_within_the_drain_timeout(
        redis_server: RedisServer, model_dir: Path, reference: Reference, tmp_path: Path) -> None:
    client: Any = redis_server.client()
    params = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    prompts = {f"d{i}": f"draining job {i}" for i in range(3)}
    first = spawn_worker(redis_server.url, model_dir, log_path=tmp_path / "w1.log", drain_timeout_s=60)
    try:
        for job_id, prompt in prompts.items():
            submit(client, job_id, prompt=prompt, params=params)
        wait_until(lambda: some_tokens_published(client, list(prompts)), timeout_s=120, what="first tokens")
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:
            first.kill()
    for job_id, prompt in prompts.items():
        evs = events(client, job_id)
        assert evs[-1].type == "done" and assert_contiguous(evs) == reference(prompt, params)[0]
    assert "event=handback" not in (tmp_path / "w1.log").read_text()


