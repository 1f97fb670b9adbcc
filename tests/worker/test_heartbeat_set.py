"""Heartbeats: the key with its TTL and the {p}:heartbeats set the gateway reads; an ACL without the set's
commands costs a warning, never the heartbeat."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from redis.asyncio import Redis

from api_client.keys import Keys
from tests.helpers.redis_server import RedisServer
from worker import health

KEYS = Keys("hbtest")


async def _beat_and_clear(url: str, **auth: Any) -> tuple[Any, Any, Any]:
    client = Redis.from_url(url, **auth)
    try:
        assert await health.beat(client, KEYS, "w1", "run-1", 5.0,
                                 health.heartbeat_value("w1", "run-1", 2, None, model="my-model"))
        admin = Redis.from_url(url)
        value = await admin.get(KEYS.heartbeat("w1"))
        members = await admin.zrangebyscore(KEYS.heartbeats, int(time.time() * 1000), "+inf")
        await health.clear(client, KEYS, "w1", "run-1")
        after = (await admin.exists(KEYS.heartbeat("w1")), await admin.zcard(KEYS.heartbeats))
        await admin.aclose()
        return value, members, after
    finally:
        await client.aclose()


def test_a_beat_sets_the_key_and_the_live_set(redis_server: RedisServer) -> None:
    value, members, after = asyncio.run(_beat_and_clear(redis_server.url))
    assert json.loads(value)["model"] == "my-model" and members == [b"w1"]
    assert after == (0, 0)


def test_an_acl_without_the_set_commands_still_beats(redis_server: RedisServer) -> None:
    admin: Any = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "old", "on", ">pw", f"~{KEYS.prefix}:*", "-@all", "+set", "+get",
                          "+del", "+ping", "+hello", "+auth", "+select", "+eval", "+evalsha")
    value, members, after = asyncio.run(_beat_and_clear(redis_server.url, username="old", password="pw"))
    assert json.loads(value)["consumer"] == "w1" and members == []
    assert after == (0, 0)


def test_the_served_model_name() -> None:
    from engine.model_files import EMBEDDED_MODEL
    from worker.settings import WorkerSettings

    assert WorkerSettings().served_model == EMBEDDED_MODEL
    assert WorkerSettings(model="/models/Qwen3-0.6B/").served_model == "Qwen3-0.6B"
    assert WorkerSettings(model="Qwen/Qwen3-0.6B").served_model == "Qwen3-0.6B"
    assert WorkerSettings(model="/m/tiny.Q4_1.gguf").served_model == "tiny.Q4_1"
    assert WorkerSettings(model="/m/x", served_model_name="prod-chat").served_model == "prod-chat"
