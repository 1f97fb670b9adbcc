"""ShardReader: XREADGROUP over every (lane, shard) job stream: lanes by priority, shards fairly.

A multi-stream XREADGROUP cannot span Redis Cluster slots, so each shard is read on its own: first a
sweep without blocking from a starting shard that moves on each call (no shard waits behind a busy
one), then, when every shard is empty, one blocking read per shard at once. The first to answer ends
the wait; the others stay in flight and are taken in by a later call, so a job arriving on any shard
is read at once. With one shard it is a single blocking XREADGROUP, as before sharding. Lanes come
first (docs/protocol.md, "Priority lanes"): the shards of a lane are swept only while the lanes above
it brought nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from api_client.keys import LANES, Keys
from worker.jobs import Entry, entries_from_reply

logger = logging.getLogger("tokenrelay.worker")

WAIT_SLACK_S = 1.0  # a blocking read answers within its BLOCK; past this extra the wait gives up


class ShardReader:
    def __init__(self, redis: Any, keys: Keys, consumer: str, ensure_group: Callable[[], Awaitable[None]]) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self._ensure_group = ensure_group
        self._next_shard = 0
        self._waits: dict[int, asyncio.Task[list[Entry]]] = {}  # shard -> blocking read in flight

    async def read(self, room: dict[str, int], block_ms: int) -> list[Entry]:
        """New entries, up to about room[lane] of each lane (blocking reads already in flight may add
        theirs), lanes in priority order: a lane is read only when the lanes above it brought nothing
        new. Within a lane the shards are swept from a starting shard that moves on each call. When no
        stream has anything, one blocking XREADGROUP per shard over its lanes with room (one slot: a
        shard's lane streams share its hash tag), COUNT 1: it only wakes the intake, which then fills
        the rest in order."""
        num_shards = self.keys.num_shards
        entries = self._harvest()
        start, self._next_shard = self._next_shard, (self._next_shard + 1) % num_shards
        for lane in LANES:
            want = room.get(lane, 0)
            if want <= 0:
                continue
            got = sum(1 for e in entries if e.lane == lane)
            for k in range(num_shards):
                if got >= want:
                    break
                shard = (start + k) % num_shards
                if shard not in self._waits:  # a read in flight there returns that shard's entries itself
                    new = await self._read_shard(shard, {lane: want - got}, None)
                    got += len(new)
                    entries.extend(new)
            if entries:
                return sorted(entries, key=lambda e: e.lane_rank)
        wake = {lane: 1 for lane in LANES if room.get(lane, 0) > 0}
        if entries or not wake:
            return sorted(entries, key=lambda e: e.lane_rank)
        if num_shards == 1 and not self._waits:
            return await self._read_shard(0, wake, block_ms)
        for shard in range(num_shards):
            if shard not in self._waits:
                self._waits[shard] = asyncio.ensure_future(self._read_shard(shard, wake, block_ms))
        await asyncio.wait(list(self._waits.values()), timeout=block_ms / 1000 + WAIT_SLACK_S,
                           return_when=asyncio.FIRST_COMPLETED)
        return sorted(self._harvest(), key=lambda e: e.lane_rank)

    async def finish(self) -> list[Entry]:
        """Wait for the blocking reads in flight (at most one BLOCK) and return what they read: entries
        delivered to us must be served or handed back, not left pending until a lease runs out."""
        waits, self._waits = list(self._waits.values()), {}
        out: list[Entry] = []
        for result in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("intake: a shard read failed while stopping: %r", result)
            else:
                out.extend(result)
        return out

    def cancel(self) -> None:
        for task in self._waits.values():
            task.cancel()
        self._waits = {}

    def _harvest(self) -> list[Entry]:
        """The entries of finished blocking reads. A failed read is raised (the intake retries) unless
        another brought entries, which must not be dropped: then it is logged."""
        out: list[Entry] = []
        error: BaseException | None = None
        for shard, task in list(self._waits.items()):
            if not task.done():
                continue
            del self._waits[shard]
            with contextlib.suppress(asyncio.CancelledError):
                exc = task.exception()
                if exc is None:
                    out.extend(task.result())
                else:
                    error = exc
        if error is not None:
            if not out:
                raise error
            logger.warning("intake: a shard read failed: %r", error)
        return out

    async def _read_shard(self, shard: int, counts: dict[str, int], block_ms: int | None) -> list[Entry]:
        """XREADGROUP on one shard's streams of the lanes in `counts` (COUNT: the largest; a lane's
        entries past its own count are kept, they were delivered to us); recreates the groups when one
        is missing (NOGROUP)."""
        streams = {self.keys.shards[shard].lane_jobs(lane): lane for lane in counts}
        try:
            reply = await self.redis.xreadgroup(self.keys.group, self.consumer, dict.fromkeys(streams, ">"),
                                                count=max(counts.values()), block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            logger.warning("group %s missing on %s (Redis restarted or flushed?): recreating it",
                           self.keys.group, ", ".join(streams))
            await self._ensure_group()
            return []
        replies: list[Any] = list(reply.items() if isinstance(reply, dict) else reply or [])
        out: list[Entry] = []
        for stream, items in replies:
            lane = streams[stream.decode() if isinstance(stream, bytes) else stream]
            out.extend(entries_from_reply(items, shard=shard, lane=lane))
        return out
