"""The write scripts against a real Redis: contiguous token indexes, exactly one final event, ownership,
dead letters, hand-back and lease renewal (which must not bump the delivery count)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import KEYS, dead_entries, events
from worker import lua
from worker.lua import Scripts


def run(server: RedisServer, body: Callable[[Any], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = Redis.from_url(server.url)
        try:
            await client.xgroup_create(KEYS.jobs, KEYS.group, id="0", mkstream=True)
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())

SHARD = KEYS.shards[0]


async def deliver(client: Any, consumer: str, job: dict[str, Any]) -> str:
    """XADD a job and read it as `consumer`: it is then pending, owned by that consumer."""
    await client.xadd(KEYS.jobs, {"job": json.dumps(job)})
    reply = await client.xreadgroup(KEYS.group, consumer, {KEYS.jobs: ">"}, count=1)
    return reply[0][1][0][0].decode()


def scripts(client: Any, consumer: str) -> Scripts:
    return Scripts(client, KEYS, consumer)


async def tokens(s: Scripts, job_id: str, entry_id: str, index: int, token_ids: list[int]) -> tuple[int, int]:
    event = json.dumps({"type": "token", "index": index, "token_ids": token_ids, "text": "x" * len(token_ids)})
    keys, args = s.tokens_many_args(SHARD, [(job_id, entry_id, index, len(token_ids), event, 60)])
    code, next_index = await s.publish_tokens_many(keys=keys, args=args)
    return int(code), int(next_index)


async def final(s: Scripts, job_id: str, entry_id: str, event: dict[str, Any], num_tokens: int = -1,
                dead: tuple[bytes, str, str, str] | None = None) -> int:
    keys, args = s.final_args(SHARD, job_id, entry_id, json.dumps(event), 60, num_tokens, dead)
    return int(await s.publish_final(keys=keys, args=args))


DONE = {"type": "done", "finish_reason": "stop", "text": "xxx", "token_ids": [1, 2, 3],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3}}


def test_token_writes_are_contiguous_and_refuse_repeats(redis_server: RedisServer) -> None:
    async def body(client: Any) -> None:
        s = scripts(client, "w1")
        entry = await deliver(client, "w1", {"id": "j1", "prompt": "hi"})
        assert await tokens(s, "j1", entry, 0, [1, 2]) == (lua.WRITTEN, 2)
        assert await tokens(s, "j1", entry, 2, [3]) == (lua.WRITTEN, 3)
        assert await tokens(s, "j1", entry, 0, [1, 2]) == (lua.ALREADY, 3)  # a retried batch
        assert await tokens(s, "j1", entry, 2, [3, 4]) == (lua.OVERLAP, 3)
        assert await tokens(s, "j1", entry, 5, [6]) == (lua.GAP, 3)
        assert 0 < await client.ttl(KEYS.result("j1")) <= 60

    run(redis_server, body)
    evs = events(redis_server.client(), "j1")
    assert [(e.index, e.token_ids) for e in evs] == [(0, [1, 2]), (2, [3])]


def test_many_deltas_in_one_call_each_get_their_own_verdict(redis_server: RedisServer) -> None:
    """The publisher's batched call: every job is checked as if alone, and one job whose stream is
    corrupt (its last event is not JSON) fails alone, with the jobs after it still written."""
    def delta(job_id: str, entry: str, index: int, token_ids: list[int]) -> tuple[str, str, int, int, str, int]:
        event = json.dumps({"type": "token", "index": index, "token_ids": token_ids, "text": "x" * len(token_ids)})
        return job_id, entry, index, len(token_ids), event, 60

    async def body(client: Any) -> list[int]:
        s = scripts(client, "w1")
        mine = [await deliver(client, "w1", {"id": f"m{i}", "prompt": "hi"}) for i in range(3)]
        theirs = await deliver(client, "w2", {"id": "t", "prompt": "hi"})
        assert await tokens(s, "m1", mine[1], 0, [1]) == (lua.WRITTEN, 1)
        await client.xadd(KEYS.result("m2"), {"event": "not json"})
        keys, args = s.tokens_many_args(SHARD, [delta("m0", mine[0], 0, [1, 2]), delta("t", theirs, 0, [9]),
                                         delta("m2", mine[2], 0, [5]), delta("m1", mine[1], 1, [2]),
                                         delta("m1", mine[1], 3, [4])])
        return [int(x) for x in await s.publish_tokens_many(keys=keys, args=args)]

    reply = run(redis_server, body)
    assert reply == [lua.WRITTEN, 2, lua.NOT_OWNER, -1, lua.ERROR, -1, lua.WRITTEN, 2, lua.GAP, 2]
    client = redis_server.client()
    assert [(e.index, e.token_ids) for e in events(client, "m0")] == [(0, [1, 2])]
    assert [(e.index, e.token_ids) for e in events(client, "m1")] == [(0, [1]), (1, [2])]
    assert events(client, "t") == []


def test_one_final_event_and_the_ack_come_together(redis_server: RedisServer) -> None:
    async def body(client: Any) -> None:
        s = scripts(client, "w1")
        entry = await deliver(client, "w1", {"id": "j1", "prompt": "hi"})
        await tokens(s, "j1", entry, 0, [1, 2, 3])
        assert await final(s, "j1", entry, DONE, num_tokens=2) == lua.GAP  # done must match the tokens
        assert (await client.xpending(KEYS.jobs, KEYS.group))["pending"] == 1
        assert await final(s, "j1", entry, DONE, num_tokens=3) == lua.WRITTEN
        assert (await client.xpending(KEYS.jobs, KEYS.group))["pending"] == 0
        # After the final event, tokens and a second final are refused (the entry is no longer owned).
        assert (await tokens(s, "j1", entry, 3, [4]))[0] == lua.NOT_OWNER
        assert await final(s, "j1", entry, DONE, num_tokens=3) == lua.NOT_OWNER

    run(redis_server, body)
    evs = events(redis_server.client(), "j1")
    assert [e.type for e in evs] == ["token", "done"]


def test_a_redelivered_job_with_a_final_event_is_only_acked(redis_server: RedisServer) -> None:
    async def body(client: Any) -> None:
        s1, s2 = scripts(client, "w1"), scripts(client, "w2")
        entry = await deliver(client, "w1", {"id": "j1", "prompt": "hi"})
        await client.xadd(KEYS.result("j1"), {"event": json.dumps(DONE)})  # e.g. the ack was lost
        await client.xclaim(KEYS.jobs, KEYS.group, "w2", 0, [entry])
        assert (await tokens(s2, "j1", entry, 3, [9]))[0] == lua.FINAL_EXISTS
        assert await final(s2, "j1", entry, {"type": "error", "code": "internal", "message": "m"}) == lua.ALREADY
        assert (await client.xpending(KEYS.jobs, KEYS.group))["pending"] == 0
        # The zombie that used to own the entry cannot write either.
        assert (await tokens(s1, "j1", entry, 3, [9]))[0] == lua.NOT_OWNER

    run(redis_server, body)
    assert [e.type for e in events(redis_server.client(), "j1")] == ["done"]


def test_a_zombie_cannot_write_after_a_takeover(redis_server: RedisServer) -> None:
    async def body(client: Any) -> None:
        zombie, heir = scripts(client, "w1"), scripts(client, "w2")
        entry = await deliver(client, "w1", {"id": "j1", "prompt": "hi"})
        await tokens(zombie, "j1", entry, 0, [1])
        await client.xclaim(KEYS.jobs, KEYS.group, "w2", 0, [entry])
        assert (await tokens(zombie, "j1", entry, 1, [2]))[0] == lua.NOT_OWNER
        assert await final(zombie, "j1", entry, DONE) == lua.NOT_OWNER
        assert await tokens(heir, "j1", entry, 1, [2]) == (lua.WRITTEN, 2)
        assert await final(heir, "j1", entry, {**DONE, "token_ids": [1, 2]}, num_tokens=2) == lua.WRITTEN
        assert await zombie.renew_leases(SHARD, [entry]) == [entry]  # the zombie learns it lost the job

    run(redis_server, body)
    evs = events(redis_server.client(), "j1")
    assert [(e.type, getattr(e, "index", None)) for e in evs] == [("token", 0), ("token", 1), ("done", None)]


def test_error_with_dead_letter_and_dead_letter_without_id(redis_server: RedisServer) -> None:
    async def body(client: Any) -> None:
        s = scripts(client, "w1")
        entry = await deliver(client, "w1", {"id": "j1", "prompt": "hi", "bogus": 1})
        error = {"type": "error", "code": "invalid_request", "message": "bogus: extra"}
        dead = (b'{"raw": 1}', "j1", "invalid_request", "bogus: extra")
        assert await final(s, "j1", entry, error, dead=dead) == lua.WRITTEN
        assert await final(s, "j1", entry, error, dead=dead) == lua.NOT_OWNER  # acked: no second letter
        await client.xadd(KEYS.jobs, {"job": b"\xff"})
        reply = await client.xreadgroup(KEYS.group, "w1", {KEYS.jobs: ">"}, count=1)
        entry2 = reply[0][1][0][0].decode()
        keys, args = s.dead_letter_args(SHARD, entry2, b"\xff", "", "invalid_request", "not UTF-8")
        assert int(await s.dead_letter(keys=keys, args=args)) == lua.WRITTEN
        assert (await client.xpending(KEYS.jobs, KEYS.group))["pending"] == 0

    run(redis_server, body)
    client: Any = redis_server.client()
    dead = dead_entries(client)
    assert [(d["job_id"], d["code"]) for d in dead] == [(b"j1", b"invalid_request"), (b"", b"invalid_request")]
    assert dead[0]["job"] == b'{"raw": 1}' and dead[1]["job"] == b"\xff"
    assert [e.type for e in events(client, "j1")] == ["error"]


def test_renew_keeps_delivery_count_and_hand_back_requeues(redis_server: RedisServer) -> None:
    async def body(client: Any) -> None:
        s = scripts(client, "w1")
        entry = await deliver(client, "w1", {"prompt": "hi"})
        await asyncio.sleep(0.05)
        assert await s.renew_leases(SHARD, [entry]) == []
        pending = await client.xpending_range(KEYS.jobs, KEYS.group, entry, entry, 1)
        assert pending[0]["times_delivered"] == 1 and pending[0]["time_since_delivered"] < 50
        keys, args = s.hand_back_args(SHARD, entry, b'{"prompt": "hi"}', entry, 2)
        assert int(await s.hand_back(keys=keys, args=args)) == lua.WRITTEN
        assert int(await s.hand_back(keys=keys, args=args)) == lua.NOT_OWNER  # only once
        reply = await client.xreadgroup(KEYS.group, "w2", {KEYS.jobs: ">"}, count=5)
        entries = reply[0][1]
        assert len(entries) == 1
        fields = entries[0][1]
        assert fields[b"job"] == b'{"prompt": "hi"}'
        assert fields[b"job_id"] == entry.encode() and fields[b"redeliveries"] == b"2"

    run(redis_server, body)
