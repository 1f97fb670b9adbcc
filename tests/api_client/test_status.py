"""Client.status / AsyncClient.status against a real redis-server, each state written the way a worker
writes it; idempotent submit (a reused id replays); waits that end with JobLost on a job that is not there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest
import redis

from api_client import AsyncClient, Client, JobLost
from api_client.keys import EVENT_FIELD, JOB_FIELD, Keys
from api_client.schema import DoneEvent, ErrorEvent, TokenEvent, Usage, dump_event
from tests.helpers.redis_server import RedisServer

KEYS = Keys("st")


def _client(server: RedisServer, **kwargs: Any) -> Client:
    return Client(server.url, prefix=KEYS.prefix, **kwargs)


def _deliver(r: Any, consumer: str = "w1") -> list[str]:
    """What a worker's intake does: XREADGROUP the new entries (creating the group as workers do)."""
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP
        r.xgroup_create(KEYS.jobs, KEYS.group, id="0", mkstream=True)
    reply = r.xreadgroup(KEYS.group, consumer, {KEYS.jobs: ">"}, count=100)
    return [entry_id.decode() for _, items in reply for entry_id, _ in items]


def _publish(r: Any, job_id: str, event: TokenEvent | DoneEvent | ErrorEvent) -> None:
    r.xadd(KEYS.result(job_id), {EVENT_FIELD: dump_event(event)})


def test_each_state_from_what_redis_holds(redis_server: RedisServer) -> None:
    r = redis_server.client()
    with _client(redis_server) as client:
        assert client.status("nobody").state == "unknown"
        assert client.poll("nobody") == ([], "0-0")
        first = client.submit("one", job_id="j1")
        second = client.submit("two", job_id="j2")
        assert not first.replayed and first.entry_id is not None
        status = client.status("j2")  # no worker yet (no group): every entry waits
        assert (status.state, status.entry_id, status.queue_lag) == ("queued", second.entry_id, 2)
        assert client.poll("j2") == ([], "0-0")  # what poll alone cannot tell apart from "nobody"
        assert _deliver(r) == [first.entry_id, second.entry_id]
        status = client.status("j1")
        assert (status.state, status.consumer, status.num_deliveries, status.num_tokens) == ("running", "w1", 1, 0)
        _publish(r, "j1", TokenEvent(index=0, token_ids=[5, 6], text="ab"))
        assert client.status("j1").num_tokens == 2
        client.submit("three", job_id="j3")
        assert (client.status("j3").state, client.status("j3").queue_lag) == ("queued", 1)
        client.cancel("j1")
        assert client.status("j1").is_cancel_requested
        _publish(r, "j1", DoneEvent(finish_reason="cancelled", text="ab", token_ids=[5, 6],
                                    usage=Usage(prompt_tokens=1, completion_tokens=2)))
        r.xack(KEYS.jobs, KEYS.group, first.entry_id)
        done = client.status("j1")
        assert (done.state, done.finish_reason, done.num_tokens) == ("done", "cancelled", 2)
        _publish(r, "j2", ErrorEvent(code="too_long", message="prompt over the context"))
        failed = client.status("j2")
        assert (failed.state, failed.error_code, failed.error_message) == ("error", "too_long", "prompt over the context")
        assert str(failed) == f"error entry={second.entry_id} code=too_long message=prompt over the context"


def test_an_xadd_without_id_is_found_by_its_entry_id(redis_server: RedisServer) -> None:
    r = redis_server.client()
    entry_id = r.xadd(KEYS.jobs, {JOB_FIELD: json.dumps({"prompt": "no id"})}).decode()
    other = r.xadd(KEYS.jobs, {JOB_FIELD: json.dumps({"id": "named", "prompt": "x"})}).decode()
    with _client(redis_server) as client:
        assert client.status(entry_id).state == "queued"
        assert client.status(other).state == "unknown"  # that entry is job "named", not job <entry id>
        _deliver(r)
        assert client.status(entry_id).state == "running"
        _publish(r, entry_id, DoneEvent(finish_reason="length", text="t", token_ids=[1],
                                        usage=Usage(prompt_tokens=1, completion_tokens=1)))
        assert client.result(entry_id, timeout=10).text == "t"


def test_a_reused_id_replays_the_earlier_job(redis_server: RedisServer) -> None:
    r = redis_server.client()
    with _client(redis_server) as client:
        first = client.submit("once", job_id="same")
        again = client.submit("once more", job_id="same")  # still queued: not queued twice
        assert again == "same" and again.replayed and again.entry_id == first.entry_id
        assert r.xlen(KEYS.jobs) == 1
        _deliver(r)
        _publish(r, "same", DoneEvent(finish_reason="stop", text="first answer", token_ids=[1],
                                      usage=Usage(prompt_tokens=1, completion_tokens=1)))
        r.xack(KEYS.jobs, KEYS.group, first.entry_id)
        later = client.submit("once more", job_id="same")  # done: its result is what the id names
        assert later.replayed and client.result(later, timeout=5).text == "first answer"
        assert r.xlen(KEYS.jobs) == 1
        # Result expired and entry trimmed: the id is free again.
        r.delete(KEYS.result("same"))
        r.xdel(KEYS.jobs, first.entry_id)
        fresh = client.submit("new", job_id="same")
        assert not fresh.replayed and fresh.entry_id != first.entry_id and client.status("same").state == "queued"


def test_waiting_on_an_unknown_id_raises_instead_of_blocking(redis_server: RedisServer) -> None:
    with _client(redis_server, unknown_timeout_s=1.0) as client, pytest.raises(JobLost, match="no job no-such-job"):
        client.result("no-such-job", timeout=30)  # before: TimeoutError after 30 s at best


def test_a_job_that_vanishes_mid_wait_is_lost_at_once(redis_server: RedisServer) -> None:
    r = redis_server.client()
    with _client(redis_server, unknown_timeout_s=None) as client:  # never-seen ids would wait forever
        job_id = client.submit("soon gone")
        _deliver(r)
        _publish(r, job_id, TokenEvent(index=0, token_ids=[1], text="a"))
        stream = client.stream(job_id, timeout=60)
        assert next(stream).type == "token"
        r.flushall()  # what a restart of a Redis without persistence does to the job
        started = time.monotonic()
        with pytest.raises(JobLost, match="was running and is gone"):
            next(stream)
        assert time.monotonic() - started < 30


def test_async_client_status_replay_and_loss(redis_server: RedisServer) -> None:
    r = redis_server.client()

    async def run() -> None:
        async with AsyncClient(redis_server.url, prefix=KEYS.prefix, unknown_timeout_s=1.0) as client:
            first = await client.submit("async", job_id="a1")
            assert not first.replayed and (await client.status("a1")).state == "queued"
            assert (await client.submit("async", job_id="a1")).replayed
            _deliver(r)
            assert (await client.status("a1")).consumer == "w1"
            with pytest.raises(JobLost):
                await client.result("never-there", timeout=30)

    asyncio.run(run())
    assert r.xlen(KEYS.jobs) == 1


def test_a_batch_lane_job_is_queued_in_its_stream_and_found_there(redis_server: RedisServer) -> None:
    r = redis_server.client()
    with _client(redis_server) as client:
        interactive = client.submit("now", job_id="i1")
        batch = client.submit("later", job_id="b1", lane="batch")
        assert r.xlen(KEYS.jobs) == 1 and r.xlen(KEYS.lane_jobs("batch")) == 1
        assert json.loads(r.xrange(KEYS.lane_jobs("batch"))[0][1][JOB_FIELD.encode()])["lane"] == "batch"
        status = client.status("b1")
        assert (status.state, status.entry_id) == ("queued", batch.entry_id)
        assert client.status("i1").entry_id == interactive.entry_id
        assert client.submit("later", job_id="b1", lane="batch").replayed  # idempotent in its lane too
        r.xgroup_create(KEYS.lane_jobs("batch"), KEYS.group, id="0", mkstream=True)
        r.xreadgroup(KEYS.group, "w1", {KEYS.lane_jobs("batch"): ">"}, count=10)
        assert (client.status("b1").state, client.status("b1").consumer) == ("running", "w1")
        with pytest.raises(ValueError, match="lane"):
            client.submit("x", lane="bulk")

    async def via_async() -> str:
        async with AsyncClient(redis_server.url, prefix=KEYS.prefix) as aclient:
            await aclient.submit("async later", job_id="b2", lane="batch")
            return (await aclient.status("b2")).state

    assert asyncio.run(via_async()) == "queued"
