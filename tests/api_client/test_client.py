"""Client and AsyncClient against a real redis-server: submit, stream (with reconnects), poll, result, cancel."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence

import pytest
import redis
import redis.asyncio as aioredis

from api_client import AsyncClient, Client, JobFailed
from api_client.keys import EVENT_FIELD, JOB_FIELD, Keys
from api_client.schema import DoneEvent, ErrorEvent, TokenEvent, dump_event, parse_job
from tests.helpers.redis_server import RedisServer, read_stream

EventT = TokenEvent | DoneEvent | ErrorEvent


def _tokens(n: int, start: int = 0) -> list[EventT]:
    return [TokenEvent(index=i, token_ids=[100 + i], text=f"t{i} ") for i in range(start, start + n)]


def _done(n: int) -> DoneEvent:
    return DoneEvent(finish_reason="length", text="".join(f"t{i} " for i in range(n)),
                     token_ids=[100 + i for i in range(n)],
                     usage={"prompt_tokens": 4, "completion_tokens": n})  # type: ignore[arg-type]


def _write(r: redis.Redis, key: str, events: Sequence[EventT], delay_s: float = 0.0) -> None:
    for event in events:
        r.xadd(key, {EVENT_FIELD: dump_event(event)})
        if delay_s:
            time.sleep(delay_s)


def _in_thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_submit_writes_one_parsable_entry(redis_server: RedisServer) -> None:
    r = redis_server.client()
    with Client(redis_server.url, prefix="tr") as client:
        job_id = client.submit("hello", max_tokens=5, temperature=0.0, stop="\n", stop_token_ids=(7,),
                               priority=2, result_ttl_s=30)
        given = client.submit(messages=[{"role": "user", "content": "hi"}], job_id="mine-1")
    assert given == "mine-1"
    entries = read_stream(r, Keys("tr").jobs)
    assert len(entries) == 2
    first = parse_job(entries[0][1][JOB_FIELD], 1 << 20)
    assert first.id == job_id and len(job_id) == 32 and first.prompt == "hello"
    assert first.params.sampling_kwargs() == {"max_tokens": 5, "temperature": 0.0, "stop": ["\n"],
                                                "stop_token_ids": [7]}
    assert (first.priority, first.result_ttl_s) == (2, 30)
    second = parse_job(entries[1][1][JOB_FIELD], 1 << 20)
    assert second.id == "mine-1" and second.messages is not None


def test_submit_validates_before_writing(redis_server: RedisServer) -> None:
    with Client(redis_server.url) as client:
        with pytest.raises(ValueError, match=r"params\.max_tokens"):
            client.submit("x", max_tokens=0)
        with pytest.raises(ValueError, match=r"params\.beams"):
            client.submit("x", beams=2)
        with pytest.raises(ValueError, match="exactly one of prompt"):
            client.submit("x", prompt_token_ids=[1])
    assert redis_server.client().exists(Keys().jobs) == 0


def test_stream_yields_in_order_and_stops_at_done(redis_server: RedisServer) -> None:
    keys, r = Keys(), redis_server.client()
    events = [*_tokens(6), _done(6)]

    def write() -> None:
        _write(r, keys.result("j1"), events, delay_s=0.01)
        _write(r, keys.result("j1"), _tokens(1, 99))  # after done: must never be read

    writer = _in_thread(write)
    with Client(redis_server.url) as client:
        got = list(client.stream("j1", timeout=20))
    writer.join()
    assert got == events


def test_stream_resumes_after_redis_kill_and_restart(redis_server: RedisServer) -> None:
    keys, key = Keys(), Keys().result("j2")
    first, rest = _tokens(6), [*_tokens(4, start=6), _done(10)]
    _write(redis_server.client(), key, first)
    got: list[EventT] = []

    def restart_and_finish() -> None:
        time.sleep(0.3)  # the client is now failing to reach the server
        redis_server.restart()
        _write(redis_server.client(), key, rest, delay_s=0.01)

    with Client(redis_server.url, prefix=keys.prefix) as client:
        for event in client.stream("j2", timeout=30):
            got.append(event)
            if len(got) == 3:  # mid-batch: three events read but not yet yielded
                redis_server.kill()
                restarter = _in_thread(restart_and_finish)
    restarter.join()
    assert got == first + rest


def test_stream_resumes_after_forced_disconnect(redis_server: RedisServer) -> None:
    key, admin = Keys().result("j3"), redis_server.client()
    events = [*_tokens(8), _done(8)]
    reader = redis.Redis.from_url(redis_server.url, client_name="reader", socket_timeout=10)

    def writer() -> None:
        _write(admin, key, events[:4])
        time.sleep(0.2)
        admin.client_kill_filter(_type="normal", skipme=True)  # drops the client's blocked XREAD
        _write(admin, key, events[4:], delay_s=0.01)

    thread = _in_thread(writer)
    got = list(Client(redis=reader).stream("j3", timeout=20))
    thread.join()
    reader.close()
    assert got == events


def test_stream_timeout(redis_server: RedisServer) -> None:
    with Client(redis_server.url) as client, pytest.raises(TimeoutError, match="no final event"):
        list(client.stream("never", timeout=0.3))


def test_poll_cursors(redis_server: RedisServer) -> None:
    key, r = Keys().result("j4"), redis_server.client()
    with Client(redis_server.url) as client:
        assert client.poll("j4") == ([], "0-0")
        _write(r, key, _tokens(3))
        batch, cursor = client.poll("j4")
        assert batch == _tokens(3)
        assert client.poll("j4", after=cursor) == ([], cursor)
        _write(r, key, [*_tokens(2, start=3), _done(5)])
        batch, cursor2 = client.poll("j4", after=cursor)
        assert batch == [*_tokens(2, start=3), _done(5)] and cursor2 != cursor
        assert cursor2 == read_stream(r, key)[-1][0]


def test_result_returns_completion(redis_server: RedisServer) -> None:
    _write(redis_server.client(), Keys().result("j5"), [*_tokens(3), _done(3)])
    with Client(redis_server.url) as client:
        completion = client.result("j5", timeout=10)
    assert completion.text == "t0 t1 t2 " and completion.token_ids == [100, 101, 102]
    assert completion.finish_reason == "length" and completion.usage.completion_tokens == 3


def test_result_raises_job_failed(redis_server: RedisServer) -> None:
    _write(redis_server.client(), Keys().result("j6"), [ErrorEvent(code="too_long", message="prompt is 9000 tokens")])
    with Client(redis_server.url) as client, pytest.raises(JobFailed) as info:
        client.result("j6", timeout=10)
    assert (info.value.code, info.value.message, info.value.job_id) == ("too_long", "prompt is 9000 tokens", "j6")


def test_cancel_sets_key_with_ttl(redis_server: RedisServer) -> None:
    r = redis_server.client()
    with Client(redis_server.url, prefix="p2") as client:
        client.cancel("j7")
    assert r.get("p2:cancel:j7") == b"1"
    assert 0 < r.ttl("p2:cancel:j7") <= 3600


def test_borrowed_redis_is_not_closed(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with Client(redis=r) as client:
        job_id = client.submit(prompt_token_ids=[1, 2, 3])
        _write(redis_server.client(), client.keys.result(job_id), [_done(0)])
        assert client.result(job_id, timeout=5).token_ids == []  # decoded replies work too
    assert r.ping()


def test_async_client_core_paths(redis_server: RedisServer) -> None:
    keys, r = Keys(), redis_server.client()

    async def scenario() -> None:
        async with AsyncClient(redis_server.url) as client:
            job_id = await client.submit("hi", max_tokens=3)
            assert parse_job(read_stream(r, keys.jobs)[0][1][JOB_FIELD], 1 << 20).id == job_id
            events = [*_tokens(4), _done(4)]
            writer = _in_thread(lambda: _write(r, keys.result(job_id), events, delay_s=0.01))
            got = [event async for event in client.stream(job_id, timeout=20)]
            writer.join()
            assert got == events
            assert (await client.poll(job_id))[0] == events
            assert (await client.result(job_id, timeout=5)).text == "t0 t1 t2 t3 "
            _write(r, keys.result("bad"), [ErrorEvent(code="overloaded", message="queue full")])
            with pytest.raises(JobFailed, match="overloaded"):
                await client.result("bad", timeout=5)
            await client.cancel(job_id)
            assert r.exists(keys.cancel(job_id)) == 1
            with pytest.raises(TimeoutError):
                await client.result("never", timeout=0.2)

    asyncio.run(scenario())


def test_async_stream_resumes_after_restart(redis_server: RedisServer) -> None:
    key = Keys().result("a2")
    first, rest = _tokens(3), [*_tokens(3, start=3), _done(6)]
    _write(redis_server.client(), key, first)

    def restart_and_finish() -> None:
        time.sleep(0.3)
        redis_server.restart()
        _write(redis_server.client(), key, rest)

    async def scenario() -> list[EventT]:
        got: list[EventT] = []
        client = AsyncClient(redis=aioredis.Redis.from_url(redis_server.url, socket_timeout=10))
        async for event in client.stream("a2", timeout=30):
            got.append(event)
            if len(got) == 2:
                redis_server.kill()
                _in_thread(restart_and_finish)
        await client.redis.aclose()
        return got

    assert asyncio.run(scenario()) == first + rest
    assert json.loads(read_stream(redis_server.client(), key)[-1][1][EVENT_FIELD])["type"] == "done"
