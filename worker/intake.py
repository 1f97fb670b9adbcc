"""Intake: read jobs from {p}:jobs (only as many as the engine has room for), validate, and submit them.

Owns the table of jobs this worker holds (RunningJob). Every entry read ends in the engine, in a final
event, or in {p}:dead: nothing is dropped silently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from api_client.keys import JOB_FIELD, JOB_ID_FIELD, Keys
from api_client.schema import ErrorEvent, Job, JobError, parse_job
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from worker.lua import REDELIVERIES_FIELD
from worker.publisher import done_event
from worker.recovery import Progress, load_progress
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from engine.async_engine import EngineFrontend
    from worker.publisher import Publisher

logger = logging.getLogger("tokenrelay.worker")


@dataclass
class Entry:
    """One {p}:jobs entry delivered to this consumer."""

    entry_id: str
    fields: dict[bytes, bytes]
    num_deliveries: int = 1  # this entry's delivery count plus the `redeliveries` it carries

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
    def enqueued_ms(self) -> int:
        return int(self.entry_id.split("-", 1)[0])


def entries_from_reply(items: Any, delivery_count: int = 1) -> list[Entry]:
    """[(id, {field: value}), ...] as redis-py returns stream entries; deleted entries (None) skipped."""
    out = []
    for entry_id, fields in items:
        if fields is None:
            continue
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        entry = Entry(eid, dict(fields))
        entry.num_deliveries = delivery_count + entry.redeliveries
        out.append(entry)
    return out


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
    # Why the worker aborted it: "cancelled" | "expired" | "handback" | "lost" | "internal".
    abort_reason: str | None = None
    error_message: str = ""
    is_finishing: bool = False  # its final event / hand-back is being written (the entry gets acked)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class JobTable:
    """The jobs this worker holds, by job id; wakes the intake whenever one leaves."""

    def __init__(self) -> None:
        self._jobs: dict[str, RunningJob] = {}
        self._changed = asyncio.Event()

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

    async def wait_changed(self, timeout_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)


class OutputHandoff:
    """Engine outputs from the engine's thread to the event loop, a burst at a time.

    A call_soon_threadsafe per output (256 a step at full batch) writes the loop's wake-up pipe and
    queues a callback each time; here outputs gather under a lock and the first of a burst schedules
    one callback that moves all of them into the publisher's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, put: Callable[[RequestOutput], None]) -> None:
        self.loop = loop
        self._put = put
        self._lock = threading.Lock()
        self._outputs: list[RequestOutput] = []

    def __call__(self, out: RequestOutput) -> None:  # any thread; never blocks
        with self._lock:
            self._outputs.append(out)
            if len(self._outputs) > 1:
                return  # the move scheduled by the first of these has not run yet: it takes this too
        self.loop.call_soon_threadsafe(self._move)

    def _move(self) -> None:  # the loop's thread
        with self._lock:
            outputs, self._outputs = self._outputs, []
        for out in outputs:
            self._put(out)


class Intake:
    def __init__(self, redis: Redis, settings: WorkerSettings, table: JobTable, engine: EngineFrontend,
                 publisher: Publisher) -> None:
        self.redis = redis
        self.settings = settings
        self.keys: Keys = settings.keys
        self.table = table
        self.engine = engine
        self.publisher = publisher
        self._handoff: OutputHandoff | None = None  # made on first use, in the running loop

    @property
    def room(self) -> int:
        """Jobs to read now: what the engine can take (sequence slots, free KV), minus jobs we hold."""
        return min(self.engine.has_capacity(), self.settings.max_num_seqs - len(self.table))

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.jobs, self.keys.group, id="0", mkstream=True)
            logger.info("created group %s on %s", self.keys.group, self.keys.jobs)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """XREADGROUP up to `count` new entries; recreates the group when it is missing (NOGROUP)."""
        try:
            reply = await self.redis.xreadgroup(self.keys.group, self.settings.consumer, {self.keys.jobs: ">"},
                                                count=count, block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            logger.warning("group %s missing (Redis restarted or flushed?): recreating it", self.keys.group)
            await self.ensure_group()
            return []
        streams: list[Any] = list(reply or [])
        return [e for _, items in streams for e in entries_from_reply(items)]

    async def admit(self, entries: list[Entry]) -> None:
        """Validate and submit entries (fresh or reclaimed); the rest get their final event here."""
        parsed: list[tuple[Entry, Job, str]] = []
        for entry in entries:
            raw = entry.raw
            if raw is None:
                await self.publisher.reject(entry, None, None, "invalid_request",
                                            f"stream entry has no '{JOB_FIELD}' field")
                continue
            try:
                job = parse_job(raw, self.settings.max_job_bytes)
            except JobError as exc:
                await self.publisher.reject(entry, exc.job_id, None, exc.code, exc.message)
                continue
            # A job without an id is known by its entry id (carried along when it is handed back).
            parsed.append((entry, job, job.id or entry.carried_job_id or entry.entry_id))
        if not parsed:
            return
        progress = await load_progress(self.redis, self.keys, [job_id for _, _, job_id in parsed])
        loop = asyncio.get_running_loop()
        for entry, job, job_id in parsed:
            await self._admit_one(entry, job, job_id, progress[job_id], loop)

    async def _admit_one(self, entry: Entry, job: Job, job_id: str, progress: Progress,
                         loop: asyncio.AbstractEventLoop) -> None:
        ttl_s = job.result_ttl_s or self.settings.result_ttl_s
        if progress.is_final:  # served already (a redelivery after the ack was lost): nothing to do
            await self.redis.xack(self.keys.jobs, self.keys.group, entry.entry_id)
            logger.info("job=%s event=skip reason=already_final entry=%s", job_id, entry.entry_id)
            return
        held = self.table.get(job_id)
        if held is not None and held.entry.entry_id == entry.entry_id:
            return  # our own running entry, taken back by XAUTOCLAIM after a stall: keep running it
        if held is not None:  # the same id twice in flight: the running one writes the final event
            await self.redis.xack(self.keys.jobs, self.keys.group, entry.entry_id)
            logger.warning("job=%s event=skip reason=duplicate_in_flight entry=%s", job_id, entry.entry_id)
            return
        if entry.num_deliveries > self.settings.max_deliveries:
            await self.publisher.reject(entry, job_id, ttl_s, "internal",
                                        f"delivered {entry.num_deliveries} times (max_deliveries="
                                        f"{self.settings.max_deliveries}): the job may crash workers")
            return
        running = RunningJob(job_id, entry, job, ttl_s, token_ids=list(progress.token_ids),
                             text_parts=[progress.text] if progress.text else [],
                             num_resumed_tokens=len(progress.token_ids))
        if progress.is_cancelled:
            await self.publisher.finish_now(running, done_event(running, "cancelled"))
            return
        if job.deadline_ms is not None and not progress.token_ids and time.time() * 1000 > job.deadline_ms:
            await self.publisher.finish_now(running, ErrorEvent(
                code="expired", message=f"deadline_ms={job.deadline_ms} passed before the job started"))
            return
        try:
            params = SamplingParams(**job.params.sampling_kwargs())
        except ValueError as exc:
            await self.publisher.reject(entry, job_id, ttl_s, "invalid_request", str(exc))
            return
        finish_reason = self._resumed_finish(running, params)
        if finish_reason is not None:  # the dead worker published every token but not the final event
            await self.publisher.finish_now(running, done_event(running, finish_reason))
            return
        self.table.add(running)
        try:
            self._submit(running, params, loop)
        except InvalidRequestError as exc:  # includes PromptTooLongError (code "too_long")
            self.table.remove(job_id)
            if exc.code == "too_long" and running.num_resumed_tokens:
                await self.publisher.finish_now(running, done_event(running, "length"))
            else:
                await self.publisher.reject(entry, job_id, ttl_s, exc.code, str(exc))
            return
        except Exception as exc:  # the engine loop died, or a bug: hand the job to another worker
            self.table.remove(job_id)
            logger.exception("job=%s event=submit_failed", job_id)
            running.abort_reason = "handback"
            running.error_message = repr(exc)
            await self.publisher.hand_back_now(running)
            return
        event = "resume" if running.num_resumed_tokens else "start"
        logger.info("job=%s event=%s entry=%s deliveries=%d resumed_tokens=%d queue_ms=%d", job_id, event,
                    entry.entry_id, entry.num_deliveries, running.num_resumed_tokens,
                    max(0, int(time.time() * 1000) - entry.enqueued_ms))

    def _submit(self, running: RunningJob, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        job = running.job
        if self._handoff is None or self._handoff.loop is not loop:
            self._handoff = OutputHandoff(loop, self.publisher.queue.put_nowait)
        on_output = self._handoff
        self.engine.submit(
            running.job_id, prompt=job.prompt, prompt_token_ids=job.prompt_token_ids,
            messages=None if job.messages is None else [m.model_dump() for m in job.messages],
            params=params, priority=job.priority, resume_token_ids=running.token_ids or None,
            on_output=on_output)

    def _resumed_finish(self, running: RunningJob, params: SamplingParams) -> str | None:
        """The finish reason of a resumed job that needs no more tokens, else None."""
        token_ids = running.token_ids
        if not token_ids:
            return None
        if len(token_ids) >= params.max_tokens:
            return "length"
        eos_ids = self.engine.eos_token_ids
        if token_ids[-1] in params.stop_token_ids or (not params.ignore_eos and token_ids[-1] in eos_ids):
            return "stop"
        return None
