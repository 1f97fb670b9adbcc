"""Health and identity: the heartbeat key {p}:worker:{consumer} (a TTL a live worker keeps refreshing),
the claim of a consumer name at start (one live worker per name), and `python -m worker --check`.

Each run of a worker has its own `incarnation` token in the heartbeat. A new run takes the name when no
heartbeat holds it, or once the heartbeat of an earlier run has expired (at most one heartbeat TTL after
a crash); a heartbeat that keeps being refreshed means a live worker has the name, and the new run
refuses to start. The check reads this worker's own heartbeat: alive, and its engine stepping."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any

import redis
import redis.exceptions
from redis.exceptions import NoPermissionError

from api_client.connection import AsyncRedis, connect
from api_client.keys import Keys
from engine.stats import EngineStats
from worker.settings import ENV_PREFIX

logger = logging.getLogger("tokenrelay.worker")

CLAIM_POLL_S = 0.25  # while waiting for an earlier run's heartbeat to expire or change
CLAIM_SLACK_S = 1.0  # beyond the old heartbeat's TTL, before deciding it is never going to expire

# KEYS: heartbeat. ARGV: incarnation, value, ttl_ms. Write the heartbeat unless another run holds the key.
_BEAT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, hb = pcall(cjson.decode, current)
  if not ok or type(hb) ~= 'table' or hb['incarnation'] ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
# KEYS: heartbeat. ARGV: incarnation. Delete the heartbeat if it is this run's.
_CLEAR = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local ok, hb = pcall(cjson.decode, current)
if ok and type(hb) == 'table' and hb['incarnation'] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ConsumerNameInUseError(RuntimeError):
    """A live worker already runs under this consumer name (`python -m worker` exits 2)."""


def heartbeat_value(consumer: str, incarnation: str, num_jobs: int, stats: EngineStats | None,
                    stalled_s: float = 0.0, model: str | None = None) -> str:
    """The heartbeat JSON. `stalled_s`: how long the engine has had work without finishing a step;
    `model`: the served model's name (the gateway's /v1/models)."""
    return json.dumps({
        "consumer": consumer, "incarnation": incarnation, "host": socket.gethostname(), "pid": os.getpid(),
        "model": model,
        "jobs": num_jobs, "running": stats.num_running if stats else 0,
        "waiting": stats.num_waiting if stats else 0, "steps": stats.num_steps if stats else 0,
        "stalled_s": round(stalled_s, 1), "kv_usage": round(stats.kv_usage, 4) if stats else 0.0,
        "time": time.time(),
    })


async def beat(client: AsyncRedis, keys: Keys, consumer: str, incarnation: str, ttl_s: float, value: str) -> bool:
    """Refresh this run's heartbeat; False when another run of the same consumer name holds it."""
    ttl_ms = max(1, int(ttl_s * 1000))
    written = await client.eval(_BEAT, 1, keys.heartbeat(consumer), incarnation, value,
                                ttl_ms)  # type: ignore[no-untyped-call]
    if written:
        now_ms = int(time.time() * 1000)
        async with client.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.heartbeats, {consumer: now_ms + ttl_ms})
            pipe.zremrangebyscore(keys.heartbeats, "-inf", now_ms)  # dead workers' names, by anyone's beat
            _check_live_set_replies(await pipe.execute(raise_on_error=False))
    return bool(written)


async def clear(client: AsyncRedis, keys: Keys, consumer: str, incarnation: str) -> None:
    """Remove this run's heartbeat (a clean stop), never another run's."""
    if await client.eval(_CLEAR, 1, keys.heartbeat(consumer), incarnation):  # type: ignore[no-untyped-call]
        async with client.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.heartbeats, consumer)
            _check_live_set_replies(await pipe.execute(raise_on_error=False))


_warned_no_live_set = False


def _check_live_set_replies(replies: list[Any]) -> None:
    """{p}:heartbeats (the live workers, for the gateway) is a help, not the heartbeat: an ACL written
    before it existed (no ZADD) costs one warning, not the worker."""
    global _warned_no_live_set
    for reply in replies:
        if isinstance(reply, NoPermissionError):
            if not _warned_no_live_set:
                _warned_no_live_set = True
                logger.warning("cannot keep the live-worker set (%s); the gateway will scan for heartbeats: "
                               "grant +zadd +zrem +zremrangebyscore (docs/security.md)", reply)
        elif isinstance(reply, Exception):
            raise reply


async def claim(client: AsyncRedis, keys: Keys, consumer: str, incarnation: str, ttl_s: float, value: str) -> None:
    """Take the consumer name for this run. Waits while the heartbeat of an earlier run (a crashed
    worker) runs out; raises ConsumerNameInUseError when the heartbeat is refreshed meanwhile."""
    key = keys.heartbeat(consumer)
    first: bytes | str | None = None
    deadline = 0.0
    while not await beat(client, keys, consumer, incarnation, ttl_s, value):
        current, ttl_ms = await client.get(key), await client.pttl(key)
        if current is None:
            continue  # expired between the two calls: the next beat takes it
        now = time.monotonic()
        if first is None:
            first = current
            deadline = now + max(ttl_s, ttl_ms / 1000) + CLAIM_SLACK_S
            logger.info("consumer %s: a heartbeat of another run is there (%s); waiting up to %.1f s for it to "
                        "expire", consumer, _describe(current), deadline - now)
        elif current != first or now > deadline:
            raise ConsumerNameInUseError(
                f"consumer name {consumer!r} is in use by a live worker ({_describe(current)}): two workers under "
                f"one name would serve each other's jobs twice. Give this worker its own {ENV_PREFIX}CONSUMER "
                "(the default is the host name), or stop the other one")
        await asyncio.sleep(CLAIM_POLL_S)
    if first is not None:
        logger.info("consumer %s: the earlier run's heartbeat expired; this run takes the name", consumer)


def _describe(value: bytes | str) -> str:
    info = _parse(value)
    if info is None:
        return "unreadable heartbeat"
    age_s = time.time() - float(info.get("time", 0) or 0)
    return f"pid {info.get('pid')} on {info.get('host', '?')}, heartbeat written {age_s:.1f} s ago"


def _parse(value: bytes | str | None) -> dict[str, Any] | None:
    try:
        info = json.loads(value) if value is not None else None
    except (ValueError, TypeError):
        return None
    return info if isinstance(info, dict) else None


def check(redis_url: str, keys: Keys, consumer: str, stall_s: float,
          socket_timeout_s: float = 5.0) -> tuple[bool, str]:
    """(ok, message) for `python -m worker --check`: ok when `consumer`'s heartbeat is alive and its
    engine has not gone `stall_s` without a step while it had work."""
    try:
        client = connect(redis_url, cluster=keys.cluster, socket_timeout=socket_timeout_s,
                         socket_connect_timeout=socket_timeout_s)
        try:
            value = client.get(keys.heartbeat(consumer))
            others = [] if value is not None else [
                keys.consumer_from_heartbeat(k) for k in client.scan_iter(match=keys.heartbeat_pattern, count=1000)]
        finally:
            client.close()
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        return False, f"cannot reach Redis at {_redact(redis_url)}: {exc}"
    if value is None:
        hint = (f"; live consumers under this prefix: {', '.join(sorted(others))} (is {ENV_PREFIX}CONSUMER "
                "right?)") if others else ""
        return False, (f"no live heartbeat for consumer {consumer!r} ({keys.heartbeat(consumer)} is missing or "
                       f"expired): the worker is not running, still loading its model, or stuck{hint}")
    info = _parse(value)
    if info is None:
        return False, f"{consumer}: unreadable heartbeat {value!r}"
    line = (f"{consumer}: jobs={info.get('jobs')} running={info.get('running')} waiting={info.get('waiting')} "
            f"steps={info.get('steps')} age_s={time.time() - float(info.get('time', 0) or 0):.1f}")
    stalled_s = float(info.get("stalled_s", 0) or 0)
    if stalled_s >= stall_s:
        return False, (f"{line}\nthe engine has not finished a step for {stalled_s:.0f} s while it had work "
                       f"({ENV_PREFIX}HEALTH_STALL_S={stall_s:g}): it is hung")
    return True, line


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if scheme else f"{user}:***@{host}"
