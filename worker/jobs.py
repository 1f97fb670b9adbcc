"""The jobs a worker holds: stream entries (Entry), the job being served (RunningJob), the table of them
(JobTable), why one was aborted (AbortReason) and the done event of a served job.

Intake, publisher and recovery all import these and nothing of each other's."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from api_client.keys import DEFAULT_LANE, JOB_FIELD, JOB_ID_FIELD, lane_rank
from api_client.schema import DoneEvent, Job, Usage
from worker.lua import REDELIVERIES_FIELD


@dataclass
class Entry:
    """One {p}:jobs entry delivered to this consumer."""

    entry_id: str
    fields: dict[bytes, bytes]
    num_deliveries: int = 1  # this entry's delivery count plus the `redeliveries` it carries
    lane: str = DEFAULT_LANE  # the lane whose stream it was read from (ShardKeys.lane_jobs)
    shard: int = 0  # the shard whose stream it was read from (api_client/keys.py)

    @property
    def raw(self) -> bytes | None:
        return self.fields.get(JOB_FIELD.encode())

    @property
    def redeliveries(self) -> int:
        value = self.fields.get(REDELIVERIES_FIELD.encode(), b"0")
        return int(value) if value.isdigit() else 0

    @property
    def carried_job_id(self) -> str | None:
        value = self.fields.get(JOB_ID_FIELD.encode())
        return value.decode("utf-8", "replace") if value else None

    @property
    def lane_rank(self) -> int:
        return lane_rank(self.lane)

    @property
    def enqueued_ms(self) -> int:
        return int(self.entry_id.split("-", 1)[0])


def entries_from_reply(items: Any, delivery_count: int = 1, shard: int = 0,
                       lane: str = DEFAULT_LANE) -> list[Entry]:
    """[(id, {field: value}), ...] as redis-py returns stream entries of one (shard, lane) job stream;
    deleted entries (None) skipped."""
    out = []
    for entry_id, fields in items:
        if fields is None:
            continue
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        entry = Entry(eid, dict(fields), lane=lane, shard=shard)
        entry.num_deliveries = delivery_count + entry.redeliveries
        out.append(entry)
    return out


class AbortReason(str, enum.Enum):
    """Why the worker stopped a job it holds. A later reason replaces an earlier one only when it ranks
    higher (JobTable.abort): whatever is decided first among the ordinary ends stands, a failed write
    beats those, and a job that is not ours any more beats everything."""

    CANCELLED = "cancelled"  # the client set {p}:cancel:{id}: done event "cancelled"
    EXPIRED = "expired"  # its deadline passed before it started: error "expired"
    HANDBACK = "handback"  # shutdown (or the engine refused it): re-queued for another worker
    INTERNAL = "internal"  # its result stream could not be written: error "internal"
    # Its entry is not ours any more (taken over while we stalled, another entry owns the stream), or a
    # publish failed midway: write nothing, leave the entry pending for whoever takes it over.
    LOST = "lost"

    @property
    def rank(self) -> int:
        return _ABORT_RANKS[self]


_ABORT_RANKS = {AbortReason.CANCELLED: 1, AbortReason.EXPIRED: 1, AbortReason.HANDBACK: 1,
                AbortReason.INTERNAL: 2, AbortReason.LOST: 3}


@dataclass
class RunningJob:
    """A job this worker holds: submitted to the engine, its final event not yet written."""

    job_id: str
    entry: Entry
    job: Job
    ttl_s: int
    token_ids: list[int] = field(default_factory=list)  # the whole completion so far (resumed + new)
    text_parts: list[str] = field(default_factory=list)
    num_resumed_tokens: int = 0
    num_prompt_tokens: int = 0
    received_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    last_token_s: float | None = None
    abort_reason: AbortReason | None = None  # written by JobTable.abort only
    error_message: str = ""
    is_finishing: bool = False  # its final event / hand-back is being written (the entry gets acked)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class JobTable:
    """The jobs this worker holds, by job id; wakes the intake whenever one leaves. It owns each job's
    abort reason, and stops the job in the engine the moment one is set."""

    def __init__(self, abort_request: Callable[[str], None] = lambda job_id: None) -> None:
        self._jobs: dict[str, RunningJob] = {}
        self._changed = asyncio.Event()
        self._abort_request = abort_request

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[RunningJob]:
        return iter(list(self._jobs.values()))

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> RunningJob | None:
        return self._jobs.get(job_id)

    def add(self, job: RunningJob) -> None:
        self._jobs[job.job_id] = job

    def remove(self, job_id: str) -> None:
        if self._jobs.pop(job_id, None) is not None:
            self._changed.set()

    def abort(self, job: RunningJob, reason: AbortReason, message: str = "") -> bool:
        """Give the job an abort reason unless it has one of equal or higher rank, and stop it in the
        engine (its final output then comes back aborted). Returns whether the reason was set."""
        current = job.abort_reason
        if current is not None and current.rank >= reason.rank:
            return False
        job.abort_reason = reason
        job.error_message = message
        self._abort_request(job.job_id)
        return True

    async def wait_changed(self, timeout_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)


def done_event(job: RunningJob, finish_reason: str) -> DoneEvent:
    return DoneEvent(finish_reason=finish_reason,  # type: ignore[arg-type]
                     text=job.text, token_ids=job.token_ids,
                     usage=Usage(prompt_tokens=job.num_prompt_tokens, completion_tokens=len(job.token_ids)))
