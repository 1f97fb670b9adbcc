"""Cancellation, burst mode, the heartbeat, metrics, and a Redis restart while the worker idles."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import (
    KEYS,
    InProcessWorker,
    assert_contiguous,
    events,
    settings_for,
    submit,
    wait_final,
    wait_until,
)

LONG = {"max_tokens": 240, "temperature": 0, "ignore_eos": True}


def test_cancel_running_and_not_yet_started_jobs(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    client.set(KEYS.cancel("early"), 1)
    worker = start_worker(settings_for(redis_server.url, model_dir))
    submit(client, "early", prompt="hello", params=LONG)
    submit(client, "running", prompt="hello", params=LONG)
    wait_until(lambda: len(events(client, "running")) >= 2, what="tokens of the running job")
    client.set(KEYS.cancel("running"), 1)
    evs = wait_final(client, "running")
    tokens = assert_contiguous(evs)
    done = evs[-1]
    assert done.type == "done" and done.finish_reason == "cancelled"
    assert 0 < len(tokens) < LONG["max_tokens"] and done.token_ids == tokens
    early = wait_final(client, "early")
    assert [(e.type, e.finish_reason, e.token_ids) for e in early] == [("done", "cancelled", [])]
    # The engine let go of the request (its blocks are free again).
    stats = worker.worker.engine.stats()
    wait_until(lambda: worker.worker.engine.stats().num_running == 0, what="engine idle")
    assert stats.num_generated_tokens < 2 * LONG["max_tokens"]
    assert client.xpending(KEYS.jobs, KEYS.group)["pending"] == 0


def test_burst_mode_exits_when_the_queue_is_empty(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    for i in range(5):
        submit(client, f"b{i}", prompt=f"hello {i}", params={"max_tokens": 6, "temperature": 0})
    worker = start_worker(settings_for(redis_server.url, model_dir), burst=True)
    worker.join(120)
    assert worker.exit_code == 0
    for i in range(5):
        evs = events(client, f"b{i}")
        assert evs[-1].type == "done" and len(assert_contiguous(evs)) == 6


def test_heartbeat_and_metrics_while_running(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client: Any = redis_server.client()
    worker = start_worker(settings_for(redis_server.url, model_dir, metrics_port=port))
    wait_until(lambda: client.exists(KEYS.heartbeat("w1")) == 1, what="heartbeat")
    assert 0 < client.pttl(KEYS.heartbeat("w1")) <= 5000
    submit(client, "m1", prompt="hello", params={"max_tokens": 5, "temperature": 0})
    submit(client, "m2", prompt="hello", params={"max_tokens": 5, "top_p": 0})  # an error
    wait_final(client, "m1")
    wait_final(client, "m2")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    wait_until(lambda: "tokenrelay_generated_tokens_total 5.0" in scrape(), what="token counter")
    text = scrape()
    assert 'tokenrelay_jobs_total{status="length"} 1.0' in text
    assert 'tokenrelay_errors_total{code="invalid_request"} 1.0' in text
    assert "tokenrelay_time_to_first_token_seconds_count 1.0" in text
    assert 'tokenrelay_queue_pending{lane="interactive"} 0.0' in text and "tokenrelay_kv_cache_usage" in text
    worker.stop()
    assert client.exists(KEYS.heartbeat("w1")) == 0  # a clean stop removes the heartbeat


def test_redis_restart_while_idle_recreates_the_group(
        model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    with RedisServer(appendonly=False) as server:  # no persistence: the restart loses the group
        client: Any = server.client()
        start_worker(settings_for(server.url, model_dir))
        submit(client, "before", prompt="hello", params={"max_tokens": 3, "temperature": 0})
        assert wait_final(client, "before")[-1].type == "done"
        server.restart()
        client = server.client()
        # The restart lost everything (the worker may already have recreated the group, so check a
        # key it never rewrites).
        assert client.exists(KEYS.result("before")) == 0
        wait_until(lambda: client.exists(KEYS.jobs) == 1, what="the group recreated (MKSTREAM)")
        submit(client, "after", prompt="hello", params={"max_tokens": 3, "temperature": 0})
        evs = wait_final(client, "after")
        assert evs[-1].type == "done" and len(assert_contiguous(evs)) == 3


def test_celery_queue_setting_serves_celery_tasks_inside_the_worker(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    from celery import Celery
    from celery.result import allow_join_result

    from api_client.celery import DEFAULT_QUEUE, celery_config, completion_from_result, send_generate

    worker = start_worker(settings_for(redis_server.url, model_dir, celery_queue=DEFAULT_QUEUE,
                                       celery_concurrency=2))
    producer = Celery("producer", config_source=celery_config(redis_server.url), set_as_current=False)
    result = send_generate(producer, "hello", job_id="celery-1", max_tokens=5, temperature=0.0)
    with allow_join_result():  # the embedded Celery worker shares this process with the test
        done = completion_from_result(result.get(timeout=120))
    evs = events(redis_server.client(), "celery-1")  # the task id is the job id on the stream path
    assert done.token_ids == assert_contiguous(evs) and len(done.token_ids) == 5
    assert worker.stop() == 0 and worker.worker.celery_door is None
