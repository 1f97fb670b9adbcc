"""AsyncClient: the asyncio producer API (redis.asyncio), the same calls as Client, awaited.

Shares job building and decoding with api_client.client, so both speak exactly one protocol."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis

from api_client.client import (
    CANCEL_TTL_S,
    DEFAULT_REDIS_URL,
    DEFAULT_SOCKET_TIMEOUT_S,
    READ_COUNT,
    RECONNECT_TIMEOUT_S,
    UNKNOWN_TIMEOUT_S,
    EventT,
    Submitted,
    _Deadline,
    _LossWatch,
    as_str,
    build_job,
    completion_from_event,
    event_from_fields,
    make_keys,
    reconnect_delay_s,
    stream_entries,
    submitted,
    with_id,
)
from api_client.connection import RETRYABLE_ERRORS, AsyncRedis, connect_async
from api_client.keys import DEFAULT_LANE, LANES, Keys, submit_keys
from api_client.schema import Completion, Job, Message
from api_client.status import (
    STATUS_SCRIPT,
    SUBMIT_SCRIPT,
    JobStatus,
    marker_ttl_s,
    status_args,
    status_from_reply,
)

logger = logging.getLogger(__name__)
_RETRYABLE = RETRYABLE_ERRORS


class AsyncClient:
    """Asyncio producer client. `AsyncClient(redis_url)` owns its connection; `AsyncClient(redis=r)` borrows r.
    `cluster` and `num_shards` as on Client (redis.asyncio.cluster.RedisCluster in cluster mode)."""

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, prefix: str = "tokenrelay", *,
                 redis: AsyncRedis | None = None, reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
                 unknown_timeout_s: float | None = UNKNOWN_TIMEOUT_S, cluster: bool | None = None,
                 num_shards: int | None = None, keys: Keys | None = None, **redis_kwargs: Any) -> None:
        self.keys = keys if keys is not None else make_keys(prefix, num_shards, cluster)
        self.reconnect_timeout_s = reconnect_timeout_s
        self.unknown_timeout_s = unknown_timeout_s
        self._owns_redis = redis is None
        if redis is None:
            redis_kwargs.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT_S)
            redis_kwargs.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT_S)
            redis = connect_async(redis_url, cluster=self.keys.cluster, **redis_kwargs)
        self.redis = redis
        self._submit_script = redis.register_script(SUBMIT_SCRIPT)
        self._status_script = redis.register_script(STATUS_SCRIPT)

    async def submit(self, prompt: str | None = None, *,
                     messages: Sequence[Mapping[str, Any] | Message] | None = None,
                     prompt_token_ids: Sequence[int] | None = None, job_id: str | None = None,
                     priority: int = 0, deadline_ms: int | None = None, result_ttl_s: int | None = None,
                     lane: str | None = None, **params: Any) -> Submitted:
        """Validate and enqueue one job; returns its id. Extra keyword arguments are sampling params;
        `lane` and `priority` as in Client.submit. An id that already names a job is not queued again."""
        job = build_job(prompt, messages=messages, prompt_token_ids=prompt_token_ids, job_id=job_id,
                        priority=priority, deadline_ms=deadline_ms, result_ttl_s=result_ttl_s, params=params,
                        lane=lane)
        return await self.submit_job(job)

    async def submit_job(self, job: Job) -> Submitted:
        """Enqueue an already built Job (an id is made if it has none) with its marker; returns its id."""
        job = with_id(job)
        assert job.id is not None
        reply = await self._submit_script(keys=submit_keys(self.keys, job.id, job.lane or DEFAULT_LANE),
                                          args=[job.to_json(), marker_ttl_s(job.result_ttl_s)])
        return submitted(job.id, reply)

    async def status(self, job_id: str) -> JobStatus:
        """Where the job is now, as Client.status finds it."""
        status = None
        for lane in LANES:
            keys, args = status_args(self.keys, job_id, lane)
            status = status_from_reply(job_id, await self._status_script(keys=keys, args=args))
            if status.state != "unknown":
                break
        assert status is not None
        return status

    async def stream(self, job_id: str, timeout: float | None = None) -> AsyncIterator[EventT]:
        """Yield the job's events in order, ending after its done/error event; resumes after the last
        entry seen across dropped connections and Redis restarts. TimeoutError past `timeout` seconds;
        JobLost when the job is not there (as Client.stream)."""
        key, last_id, deadline = self.keys.result(job_id), "0-0", _Deadline(timeout)
        down_since: float | None = None
        watch = _LossWatch(job_id, self.unknown_timeout_s)
        while True:
            block_ms = deadline.block_ms(job_id)
            try:
                reply: Any = await self.redis.xread({key: last_id}, count=READ_COUNT, block=block_ms)
                entries = list(stream_entries(reply))
                if not entries and watch.is_due:
                    watch.observe(await self.status(job_id))
            except _RETRYABLE as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning("job=%s redis connection lost (%s); reconnecting", job_id, exc)
                await self._wait_reconnect(exc, down_since, deadline)
                continue
            down_since = None
            if entries:
                watch.saw_events()
            for entry_id, fields in entries:
                last_id = entry_id
                event = event_from_fields(fields)
                yield event
                if event.is_final:
                    return

    async def poll(self, job_id: str, after: str = "0-0") -> tuple[list[EventT], str]:
        """Events after cursor `after` (exclusive) without blocking, and the cursor to pass next."""
        entries: Any = await self.redis.xrange(self.keys.result(job_id), min=f"({after}", max="+")
        events = [event_from_fields(fields) for _id, fields in entries]
        return events, as_str(entries[-1][0]) if entries else after

    async def result(self, job_id: str, timeout: float | None = None) -> Completion:
        """Wait for the job's final event: the Completion, or JobFailed on an error event."""
        async for event in self.stream(job_id, timeout=timeout):
            if event.is_final:
                return completion_from_event(job_id, event)
        raise AssertionError("stream() ended without a final event")

    async def cancel(self, job_id: str, ttl_s: int = CANCEL_TTL_S) -> None:
        await self.redis.set(self.keys.cancel(job_id), "1", ex=ttl_s)

    async def close(self) -> None:
        if self._owns_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _wait_reconnect(self, exc: BaseException, down_since: float, deadline: _Deadline) -> None:
        waited = time.monotonic() - down_since
        left = deadline.remaining()
        if left is None and waited > self.reconnect_timeout_s:
            raise redis.ConnectionError(
                f"Redis unreachable for {waited:.0f} s (reconnect_timeout_s={self.reconnect_timeout_s}): {exc}")
        await asyncio.sleep(min(reconnect_delay_s(waited), 1.0 if left is None else max(0.0, left)))
