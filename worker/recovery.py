"""Recovery: lease renewal of running jobs, takeover of jobs from dead consumers, resume state.

A job's progress lives only in its result stream: a worker taking a job over reads it back and resumes
generation after the last published token, so clients see every index exactly once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio import Redis

from api_client.keys import EVENT_FIELD, Keys
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


async def load_progress(redis: Redis, keys: Keys, job_ids: Sequence[str]) -> dict[str, Progress]:
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
    """Leases (XCLAIM JUSTID of our running entries) and takeovers (XAUTOCLAIM of idle ones)."""

    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts, consumer: str, lease_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts
        self.consumer = consumer
        self.lease_ms = lease_ms
        self._cursor = "0-0"

    async def renew(self, table: JobTable) -> list[str]:
        """Renew the leases of the jobs we hold; returns the job ids whose entry we no longer own
        (another worker took it over while we stalled, or Redis lost it)."""
        by_entry = {job.entry.entry_id: job.job_id for job in table
                    if job.abort_reason is not AbortReason.LOST and not job.is_finishing}
        lost_entries = await self.scripts.renew_leases(list(by_entry))
        return [by_entry[e] for e in lost_entries if e in by_entry]

    async def claim_own_pending(self) -> list[Entry]:
        """Entries a previous life of this consumer left pending: claim them again (which bumps their
        delivery count, so a job that crashes the worker each time ends in {p}:dead)."""
        pending = await self.redis.xpending_range(self.keys.jobs, self.keys.group, "-", "+", MAX_CLAIM_OWN,
                                                  consumername=self.consumer)
        ids: list[Any] = [p["message_id"] for p in pending]
        if not ids:
            return []
        claimed = await self.redis.xclaim(self.keys.jobs, self.keys.group, self.consumer, 0, ids)
        entries = await self._with_delivery_counts(cast("list[Any]", claimed))
        if entries:
            logger.info("claimed %d pending entries of an earlier run of consumer %s", len(entries),
                        self.consumer)
        return entries

    async def reclaim(self, count: int) -> list[Entry]:
        """Take over up to `count` entries idle longer than the lease (their worker is gone)."""
        if count <= 0:
            return []
        reply = await self.redis.xautoclaim(self.keys.jobs, self.keys.group, self.consumer, self.lease_ms,
                                            self._cursor, count=count)
        cursor, items = reply[0], reply[1]
        self._cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries = await self._with_delivery_counts(items)
        for entry in entries:
            logger.info("entry=%s event=reclaimed deliveries=%d", entry.entry_id, entry.num_deliveries)
        return entries

    async def has_pending(self) -> bool:
        """Whether any entry of the group is unacknowledged (held by any consumer)."""
        summary = await self.redis.xpending(self.keys.jobs, self.keys.group)
        return bool(summary and summary.get("pending"))

    async def _with_delivery_counts(self, items: Sequence[Any]) -> list[Entry]:
        entries = entries_from_reply(items)
        if not entries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.xpending_range(self.keys.jobs, self.keys.group, entry.entry_id, entry.entry_id, 1)
        replies = await pipe.execute()
        for entry, reply in zip(entries, replies, strict=True):
            count = int(reply[0]["times_delivered"]) if reply else 1
            entry.num_deliveries = count + entry.redeliveries
        return entries
