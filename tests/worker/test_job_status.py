"""Job status against a real worker: a job handed back keeps its status (the marker follows it), a job
without an id is served to and found by its entry id, and a client waiting on a job that a Redis restart
without persistence dropped learns it at once instead of waiting out its timeout."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api_client import Client, JobLost
from api_client.keys import JOB_FIELD
from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import KEYS, PREFIX, InProcessWorker, events, settings_for, wait_final, wait_until

LONG = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}


def test_status_follows_a_handed_back_job_to_its_new_entry(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    with Client(redis_server.url, prefix=PREFIX) as producer:
        job_id = producer.submit("handed back", **LONG)
        first = start_worker(settings_for(redis_server.url, model_dir, drain_timeout_s=0, max_model_len=512))
        wait_until(lambda: producer.status(job_id).num_tokens >= 2, what="tokens")
        assert producer.status(job_id).consumer == "w1"
        assert first.stop() == 0  # no drain time: the job goes back to the queue with its tokens
        status = producer.status(job_id)
        assert status.state == "running" and status.entry_id != job_id.entry_id  # the re-queued entry
        assert client.get(KEYS.job(job_id)).decode() == status.entry_id
        start_worker(settings_for(redis_server.url, model_dir, consumer="w2", max_model_len=512))
        completion = producer.result(job_id, timeout=120)
        assert len(completion.token_ids) == LONG["max_tokens"] and producer.status(job_id).state == "done"


def test_a_job_without_id_is_served_to_and_found_by_its_entry_id(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    # What `redis-cli XADD trtest:jobs '*' job '{"prompt": ...}'` does; the reply is the entry id.
    entry_id = client.xadd(KEYS.jobs, {JOB_FIELD: '{"prompt": "no id", "params": {"max_tokens": 3}}'}).decode()
    with Client(redis_server.url, prefix=PREFIX) as producer:
        assert producer.status(entry_id).state == "queued"
        start_worker(settings_for(redis_server.url, model_dir))
        assert len(producer.result(entry_id, timeout=60).token_ids) == 3
    assert wait_final(client, entry_id)[-1].type == "done"


def test_a_wait_on_a_job_lost_in_a_redis_restart_ends_with_job_lost(
        model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    with RedisServer(appendonly=False) as server:  # like the in-memory Redis `python -m worker` starts
        client: Any = server.client()
        start_worker(settings_for(server.url, model_dir))
        outcome: list[BaseException | str] = []
        with Client(server.url, prefix=PREFIX, unknown_timeout_s=None) as producer:
            job_id = producer.submit("lost in a restart", max_tokens=240, temperature=0.0, ignore_eos=True)

            def wait() -> None:
                try:
                    outcome.append(producer.result(job_id, timeout=300).finish_reason)
                except BaseException as exc:  # the test inspects it
                    outcome.append(exc)

            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            wait_until(lambda: len(events(client, job_id)) >= 2, what="tokens")
            server.restart()  # every key is gone: the job's entry, its PEL record, its result stream
            waiter.join(60)  # far under the 300 s timeout
            assert not waiter.is_alive(), "the client still waits on a job Redis no longer has"
        assert len(outcome) == 1 and isinstance(outcome[0], JobLost), outcome
        with pytest.raises(JobLost, match="was running and is gone"):
            raise outcome[0]
