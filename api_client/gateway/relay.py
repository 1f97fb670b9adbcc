"""The gateway's side of the queue: which workers are alive (and what they serve), how deep the queue
is, enqueueing jobs, reading their result streams, cancelling them.

The gateway keeps no job state of its own: everything is in Redis, so any replica can serve any
request and a gateway that dies loses nothing a client could not read again from `{p}:result:{id}`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from api_client.async_client import AsyncClient
from api_client.client import CANCEL_TTL_S, as_str, event_from_fields
from api_client.connection import AsyncRedis
from api_client.keys import Keys
from api_client.schema import DoneEvent, ErrorEvent, Job, TokenEvent

logger = logging.getLogger("tokenrelay.gateway")

LIVE_STATE_TTL_S = 1.0  # the live workers and the queue depth are read again after this long
READ_COUNT = 256


@dataclass(frozen=True)
class LiveState:
    num_workers: int
    models: frozenset[str]  # served model names from the heartbeats
    has_unnamed: bool  # a worker that names no model (an older worker): any model name is served
    queue_depth: int  # jobs not yet delivered to any worker
    read_at: float = field(default_factory=time.monotonic)

    def serves(self, model: str) -> bool:
        return self.has_unnamed or model in self.models


class Relay:
    def __init__(self, redis: AsyncRedis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._state: LiveState | None = None
        self._client = AsyncClient(redis=redis, keys=keys)  # borrows the connection

    async def live_state(self, *, fresh: bool = False) -> LiveState:
        """The live workers and the queue depth, read at most every LIVE_STATE_TTL_S; `fresh` reads
        now (so a worker that just started is seen before a request is turned away)."""
        state = self._state
        if fresh or state is None or time.monotonic() - state.read_at > LIVE_STATE_TTL_S:
            state = self._state = await self._read_state()
        return state

    async def _read_state(self) -> LiveState:
        now_ms = int(time.time() * 1000)
        consumers: list[Any] = await self.redis.zrangebyscore(self.keys.heartbeats, now_ms, "+inf")
        keys = [self.keys.heartbeat(as_str(c)) for c in consumers]
        if not keys:
            # Workers whose ACL cannot keep the set still beat: scan for them (a rare, idle case).
            keys = [as_str(k) async for k in self.redis.scan_iter(match=self.keys.heartbeat_pattern, count=1000)]
        values: list[Any] = await self.redis.mget(keys) if keys else []
        models: set[str] = set()
        num_workers = 0
        has_unnamed = False
        for value in values:
            if value is None:  # its heartbeat key expired before its set entry was trimmed
                continue
            num_workers += 1
            try:
                model = json.loads(value).get("model")
            except (ValueError, AttributeError):
                model = None
            if isinstance(model, str) and model:
                models.add(model)
            else:
                has_unnamed = True
        return LiveState(num_workers, frozenset(models), has_unnamed, await self._queue_depth())

    async def _queue_depth(self) -> int:
        """Jobs not yet delivered, over every shard."""
        return sum([await self._shard_depth(shard.jobs) for shard in self.keys.shards])

    async def _shard_depth(self, jobs: str) -> int:
        try:
            groups = await self.redis.xinfo_groups(jobs)
        except ResponseError:  # no stream yet: nothing waits
            return 0
        group = next((g for g in groups if g.get("name") in (self.keys.group, self.keys.group.encode())), None)
        if group is None:  # no worker ever joined: every entry waits
            return int(await self.redis.xlen(jobs))
        lag = group.get("lag")
        # Redis reports no lag when it cannot tell (entries deleted mid-stream): count none waiting.
        return int(lag) if lag is not None else 0

    async def submit(self, jobs: Sequence[Job]) -> None:
        """Enqueue as the Python client does (with each job's marker), so Client.status knows them."""
        for job in jobs:
            await self._client.submit_job(job)

    async def cancel(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.set(self.keys.cancel(job_id), "1", ex=CANCEL_TTL_S)
            await pipe.execute()

    def reader(self, job_ids: Sequence[str]) -> ResultReader:
        return ResultReader(self.redis, self.keys, job_ids)


Event = TokenEvent | DoneEvent | ErrorEvent


class ResultReader:
    """Reads the result streams of one request's jobs, in order per job: one XREAD BLOCK over the
    streams of each shard (one XREAD cannot span Redis Cluster slots), the shards at once."""

    def __init__(self, redis: AsyncRedis, keys: Keys, job_ids: Sequence[str]) -> None:
        self.redis = redis
        self.job_ids = list(job_ids)
        self._index = {keys.result(job_id): i for i, job_id in enumerate(job_ids)}
        self._shard = {keys.result(job_id): keys.shard_of(job_id) for job_id in job_ids}
        self._last = {key: "0-0" for key in self._index}  # streams not finished yet, and where we are

    @property
    def is_done(self) -> bool:
        return not self._last

    @property
    def open_job_ids(self) -> list[str]:
        return [self.job_ids[self._index[key]] for key in self._last]

    async def read(self, block_ms: int) -> list[tuple[int, Event]]:
        """The events that arrived (waiting up to block_ms for one): (choice index, event)."""
        if not self._last:
            return []
        by_shard: dict[int, dict[Any, Any]] = {}
        for key, last in self._last.items():
            by_shard.setdefault(self._shard[key], {})[key] = last
        block = max(1, block_ms)
        if len(by_shard) == 1:
            replies: list[Any] = [await self.redis.xread(next(iter(by_shard.values())), count=READ_COUNT, block=block)]
        else:
            replies = await self._read_shards(list(by_shard.values()), block)
        events: list[tuple[int, Event]] = []
        for reply in replies:
            events.extend(self._take(reply))
        return events

    async def _read_shards(self, groups: list[dict[Any, Any]], block_ms: int) -> list[Any]:
        """One blocking XREAD per shard at once; the first answer ends the wait and the others are
        cancelled (a read changes nothing in Redis: what they would have read comes next time)."""
        tasks = [asyncio.ensure_future(self.redis.xread(g, count=READ_COUNT, block=block_ms)) for g in groups]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in done if isinstance(r, Exception)]
        replies = [r for r in done if not isinstance(r, BaseException)]
        if errors and not any(replies):
            raise errors[0]
        return replies

    def _take(self, reply: Any) -> list[tuple[int, Event]]:
        events: list[tuple[int, Event]] = []
        for raw_key, entries in (reply.items() if isinstance(reply, dict) else reply or []):
            key = as_str(raw_key)
            for entry_id, fields in entries:
                if key not in self._last:
                    break  # entries after a final event (none are written): ignore
                self._last[key] = as_str(entry_id)
                event = event_from_fields(fields)
                events.append((self._index[key], event))
                if event.is_final:
                    del self._last[key]
        return events
