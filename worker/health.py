"""Health: the heartbeat key {p}:worker:{consumer} (a TTL a live worker keeps refreshing) and
`python -m worker --check`, which exits non-zero when no live heartbeat exists (compose healthchecks)."""

from __future__ import annotations

import json
import os
import time

import redis
from redis.asyncio import Redis

from api_client.keys import Keys
from engine.stats import EngineStats


def heartbeat_value(consumer: str, num_jobs: int, stats: EngineStats | None) -> str:
    return json.dumps({
        "consumer": consumer, "pid": os.getpid(), "jobs": num_jobs,
        "running": stats.num_running if stats else 0, "waiting": stats.num_waiting if stats else 0,
        "kv_usage": round(stats.kv_usage, 4) if stats else 0.0, "time": time.time(),
    })


async def beat(client: Redis, keys: Keys, consumer: str, ttl_s: float, value: str) -> None:
    await client.set(keys.heartbeat(consumer), value, px=max(1, int(ttl_s * 1000)))


async def clear(client: Redis, keys: Keys, consumer: str) -> None:
    await client.delete(keys.heartbeat(consumer))


def check(redis_url: str, keys: Keys, socket_timeout_s: float = 5.0) -> tuple[bool, str]:
    """(ok, message): ok when at least one worker heartbeat under the prefix is alive."""
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                      socket_connect_timeout=socket_timeout_s)
        try:
            live = []
            for key in client.scan_iter(match=keys.heartbeat_pattern, count=1000):
                value = client.get(key)
                if value is not None:
                    live.append((keys.consumer_from_heartbeat(key), value))
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        return False, f"cannot reach Redis at {_redact(redis_url)}: {exc}"
    if not live:
        return False, f"no live worker heartbeat under {keys.heartbeat_pattern}"
    lines = []
    for consumer, value in live:
        try:
            info = json.loads(value)
            lines.append(f"{consumer}: jobs={info.get('jobs')} running={info.get('running')} "
                         f"waiting={info.get('waiting')} age_s={time.time() - float(info.get('time', 0)):.1f}")
        except (ValueError, TypeError):
            lines.append(f"{consumer}: (unreadable heartbeat)")
    return True, f"{len(live)} live worker(s)\n" + "\n".join(lines)


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if scheme else f"{user}:***@{host}"
