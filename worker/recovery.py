"""Recovery: lease renewal of running jobs, takeover of jobs from dead consumers, resume state.

A job's progress lives only in its result stream: a worker taking a job over reads it back and resumes
generation after the last published token, so clients see every index exactly once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from api_client.connection import AsyncRedis
from api_client.keys import EVENT_FIELD, LANES, Keys
from api_client.schema import TokenEvent, parse_event
from worker.jobs import AbortReason, Entry, JobTable, entries_from_reply

if TYPE_CHECKING:
    from worker.lua import Scripts

logger = logging.getLogger("tokenrelay.worker")

MAX_CLAIM_OWN = 10_000  # pending entries of our own earlier life read back at startup


@dataclass
class Progress:
    """What a job's result stream says about it."""

    token_ids: list[int] = field(default_factory=list)  # published completion tokens, contiguous from 0
    text: str = ""
    is_final: bool = False
    is_cancelled: bool = False


def progress_from_entries(items: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> Progress:
    progress = Progress()
    texts: list[str] = []
    for _, fields in items:
        raw = fields.get(EVENT_FIELD.encode())
        if raw is None:
            continue
        try:
            event = parse_event(raw)
        except ValueError:
            logger.warning("malformed event in a result stream ignored: %r", raw[:200])
            continue
        if not isinstance(event, TokenEvent):
            progress.is_final = True
            break
        # The scripts keep indexes contiguous; anything else would be a foreign writer: stop there.
        if event.index != len(progress.token_ids):
            logger.warning("result stream not contiguous at index %d (expected %d)", event.index,
                           len(progress.token_ids))
            break
        progress.token_ids.extend(event.token_ids)
        texts.append(event.text)
    progress.text = "".join(texts)
    return progress


async def load_progress(redis: AsyncRedis, keys: Keys, job_ids: Sequence[str]) -> dict[str, Progress]:
    """Published tokens, final-event presence and cancel flag of each job, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.xrange(keys.result(job_id))
        pipe.exists(keys.cancel(job_id))
    replies = await pipe.execute()
    out = {}
    for i, job_id in enumerate(job_ids):
        progress = progress_from_entries(replies[2 * i])
        progress.is_cancelled = bool(replies[2 * i + 1])
        out[job_id] = progress
    return out


class Recovery:
    """Leases (XCLAIM JUSTID of our running entries) and takeovers (XAUTOCLAIM of idle ones), on every
    (lane, shard) job stream: the highest lane first, one command per stream (a shard's streams are one
    cluster slot)."""

    def __init__(self, redis: AsyncRedis, keys: Keys, scripts: Scripts, consumer: str, lease_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.consumer = consumer
        self.lease_ms = lease_ms
        self._cursors = {(lane, s): "0-0" for lane in LANES for s in range(keys.num_shards)}  # XAUTOCLAIM's
        self._next_shard = 0  # the shard the next reclaim starts with in each lane (round robin)

    async def renew(self, table: JobTable) -> list[str]:
        """Renew the leases of the jobs we hold; returns the job ids whose entry we no longer own
        (another worker took it over while we stalled, or Redis lost it)."""
        by_stream: dict[tuple[int, str], dict[str, str]] = {}
        for job in table:
            if job.abort_reason is not AbortReason.LOST and not job.is_finishing:
                by_stream.setdefault((job.entry.shard, job.entry.lane), {})[job.entry.entry_id] = job.job_id
        lost: list[str] = []
        for (shard, lane), by_entry in by_stream.items():
            lost_entries = await self.scripts.renew_leases(self.keys.shards[shard], list(by_entry), lane)
            lost.extend(by_entry[e] for e in lost_entries if e in by_entry)
        return lost

    async def claim_own_pending(self) -> list[Entry]:
        """Entries a previous life of this consumer left pending: claim them again (which bumps their
        delivery count, so a job that crashes the worker each time ends in {p}:dead)."""
        out: list[Entry] = []
        for lane in LANES:
            for shard in self.keys.shards:
                stream = shard.lane_jobs(lane)
                pending = await self.redis.xpending_range(stream, self.keys.group, "-", "+", MAX_CLAIM_OWN,
                                                          consumername=self.consumer)
                ids: list[Any] = [p["message_id"] for p in pending]
                if not ids:
                    continue
                claimed = await self.redis.xclaim(stream, self.keys.group, self.consumer, 0, ids)
                out.extend(await self._with_delivery_counts(cast("list[Any]", claimed), shard.index, lane))
        if out:
            logger.info("claimed %d pending entries of an earlier run of consumer %s", len(out), self.consumer)
        return out

    async def reclaim(self, room: dict[str, int]) -> list[Entry]:
        """Take over entries idle longer than the lease (their worker is gone): up to room[lane] of each
        lane, highest first; within a lane shard after shard from a starting shard that moves on each
        call, so no shard's dead entries wait on another's."""
        out: list[Entry] = []
        num_shards = self.keys.num_shards
        start, self._next_shard = self._next_shard, (self._next_shard + 1) % num_shards
        for lane in LANES:
            count, got = room.get(lane, 0), 0
            for k in range(num_shards):
                if got >= count:
                    break
                shard = self.keys.shards[(start + k) % num_shards]
                reply = await self.redis.xautoclaim(shard.lane_jobs(lane), self.keys.group, self.consumer,
                                                    self.lease_ms, self._cursors[lane, shard.index],
                                                    count=count - got)
                cursor, items = reply[0], reply[1]
                self._cursors[lane, shard.index] = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
                claimed = await self._with_delivery_counts(items, shard.index, lane)
                got += len(claimed)
                out.extend(claimed)
        for entry in out:
            logger.info("entry=%s event=reclaimed lane=%s shard=%d deliveries=%d", entry.entry_id, entry.lane,
                        entry.shard, entry.num_deliveries)
        return out

    async def has_pending(self) -> bool:
        """Whether any entry of the group is unacknowledged (held by any consumer), in any lane's stream
        on any shard."""
        for shard in self.keys.shards:
            for stream in shard.lane_streams.values():
                summary = await self.redis.xpending(stream, self.keys.group)
                if summary and summary.get("pending"):
                    return True
        return False

    async def _with_delivery_counts(self, items: Sequence[Any], shard: int, lane: str) -> list[Entry]:
        entries = entries_from_reply(items, shard=shard, lane=lane)
        if not entries:
            return []
        jobs = self.keys.shards[shard].lane_jobs(lane)
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.xpending_range(jobs, self.keys.group, entry.entry_id, entry.entry_id, 1)
        replies = await pipe.execute()
        for entry, reply in zip(entries, replies, strict=True):
            count = int(reply[0]["times_delivered"]) if reply else 1
            entry.num_deliveries = count + entry.redeliveries
        return entries
