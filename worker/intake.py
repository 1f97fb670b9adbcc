"""Intake: read jobs from the lane streams ({p}:jobs, {p}:jobs:batch; only as many as there is room
for, the highest lane first), validate, and submit them.

It decides what each entry read becomes (admit, finish, reject, hand back, skip: Intake._decide) and
carries the decision out in one place (Intake._carry_out). Every entry read ends in the engine, in a
final event, or in {p}:dead: nothing is dropped silently."""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from api_client.keys import JOB_FIELD, JOB_ID_FIELD, LANES, Keys
from api_client.schema import DoneEvent, ErrorEvent, Job, JobError, parse_job
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from worker.jobs import AbortReason, Entry, JobTable, RunningJob, done_event
from worker.lua import REDELIVERIES_FIELD
from worker.reader import ShardReader
from worker.recovery import Progress, load_progress
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from engine.core_client import EngineFrontend
    from worker.publisher import Publisher

logger = logging.getLogger("tokenrelay.worker")


class Verdict(enum.Enum):
    SKIP = "skip"  # nothing to serve: a redelivery (acked) or our own entry back from XAUTOCLAIM
    ADMIT = "admit"  # to be submitted to the engine
    STARTED = "started"  # the engine took it
    FINISH = "finish"  # a final event without the engine (cancelled, expired, resumed complete)
    REJECT = "reject"  # an error event and a {p}:dead letter
    HAND_BACK = "hand_back"  # re-queued for another worker


@dataclass
class Decision:
    verdict: Verdict
    running: RunningJob | None = None
    event: DoneEvent | ErrorEvent | None = None  # FINISH
    params: SamplingParams | None = None  # ADMIT
    code: str = ""  # REJECT
    message: str = ""  # REJECT
    reason: str = ""  # SKIP: why it is acknowledged (empty: keep it, it is ours and running)


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
    def __init__(self, redis: Any, settings: WorkerSettings, table: JobTable, engine: EngineFrontend,
                 publisher: Publisher) -> None:
        self.redis = redis
        self.settings = settings
        self.keys: Keys = settings.keys
        self.table = table
        self.engine = engine
        self.publisher = publisher
        self._handoff: OutputHandoff | None = None  # made on first use, in the running loop
        self.reader = ShardReader(redis, self.keys, settings.consumer, self.ensure_group)

    def room_by_lane(self) -> dict[str, int]:
        """Jobs to read now from each lane, highest lane first. A lane's room is the most jobs held
        (max_num_seqs + queue_lookahead) minus the jobs we hold of it and of the lanes above it:
        interactive work is read even while batch work fills every seat (the engine preempts batch work
        for it), and batch work only gets seats the lanes above leave free. The lowest lane is also
        held to what the engine can take now (plus the lookahead, which waits in the engine, where the
        priority policy orders it)."""
        held = [0] * len(LANES)
        for job in self.table:
            held[job.entry.lane_rank] += 1
        limit = self.settings.num_jobs_held_max
        room, num_above = {}, 0
        for rank, lane in enumerate(LANES):
            num_above += held[rank]
            room[lane] = limit - num_above
        lookahead = limit - self.settings.max_num_seqs
        room[LANES[-1]] = min(room[LANES[-1]], self.engine.has_capacity() + lookahead)
        return {lane: max(0, n) for lane, n in room.items()}

    async def ensure_group(self) -> None:
        """The consumer group on every shard's stream of every lane (created at id 0 with MKSTREAM)."""
        for shard in self.keys.shards:
            for stream in shard.lane_streams.values():
                try:
                    await self.redis.xgroup_create(stream, self.keys.group, id="0", mkstream=True)
                    logger.info("created group %s on %s", self.keys.group, stream)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def read(self, room: dict[str, int], block_ms: int) -> list[Entry]:
        """XREADGROUP up to room[lane] new entries of each lane, lanes first, from the shards
        (worker/reader.py)."""
        return await self.reader.read(room, block_ms)

    async def _moved(self, entry: Entry, job_id: str) -> bool:
        """A job queued on another shard than its id's (a producer that does not know the shard
        count): its keys live on its id's shard, so it moves there, in its own lane (a new entry
        carrying its id and deliveries, then the ack here: at least once, and a duplicate is skipped).
        False: it is home."""
        target = self.keys.for_job(job_id)
        if target.index == entry.shard:
            return False
        fields: dict[Any, Any] = {k.decode(errors="replace"): v for k, v in entry.fields.items()}
        fields.update({JOB_ID_FIELD: job_id, REDELIVERIES_FIELD: max(0, entry.num_deliveries - 1)})
        await self.redis.xadd(target.lane_jobs(entry.lane), fields)
        await self.redis.xack(self.keys.shards[entry.shard].lane_jobs(entry.lane), self.keys.group, entry.entry_id)
        logger.info("job=%s event=moved entry=%s lane=%s from_shard=%d to_shard=%d", job_id, entry.entry_id,
                    entry.lane, entry.shard, target.index)
        return True

    async def admit(self, entries: list[Entry]) -> None:
        """Validate and submit entries (fresh or reclaimed); the rest get their final event here."""
        parsed: list[tuple[Entry, Job, str]] = []
        for entry in entries:
            raw = entry.raw
            if raw is None:
                await self._carry_out(entry, None, Decision(Verdict.REJECT, code="invalid_request",
                                                            message=f"stream entry has no '{JOB_FIELD}' field"))
                continue
            try:
                job = parse_job(raw, self.settings.max_job_bytes)
            except JobError as exc:
                if exc.job_id and await self._moved(entry, exc.job_id):
                    continue
                await self._carry_out(entry, exc.job_id, Decision(Verdict.REJECT, code=exc.code, message=exc.message))
                continue
            # A job without an id is known by its entry id (carried along when it is handed back).
            job_id = job.id or entry.carried_job_id or entry.entry_id
            if not await self._moved(entry, job_id):
                parsed.append((entry, job, job_id))
        if not parsed:
            return
        progress = await load_progress(self.redis, self.keys, [job_id for _, _, job_id in parsed])
        loop = asyncio.get_running_loop()
        for entry, job, job_id in parsed:
            decision = self._decide(entry, job, job_id, progress[job_id])
            if decision.verdict is Verdict.ADMIT:
                decision = self._submit(decision, loop)
            await self._carry_out(entry, job_id, decision)

    def _decide(self, entry: Entry, job: Job, job_id: str, progress: Progress) -> Decision:
        """What to do with one parsed entry, from the table and the job's result stream alone."""
        ttl_s = job.result_ttl_s or self.settings.result_ttl_s
        if progress.is_final:  # served already (a redelivery after the ack was lost): nothing to do
            return Decision(Verdict.SKIP, reason="already_final")
        held = self.table.get(job_id)
        if held is not None and held.entry.entry_id == entry.entry_id:
            # Our own running entry, taken back by XAUTOCLAIM after a stall: keep running it.
            return Decision(Verdict.SKIP, reason="")
        if held is not None:  # the same id twice in flight: the running one writes the final event
            return Decision(Verdict.SKIP, reason="duplicate_in_flight")
        running = RunningJob(job_id, entry, job, ttl_s, token_ids=list(progress.token_ids),
                             text_parts=[progress.text] if progress.text else [],
                             num_resumed_tokens=len(progress.token_ids))
        if entry.num_deliveries > self.settings.max_deliveries:
            return Decision(Verdict.REJECT, running, code="internal", message=(
                f"delivered {entry.num_deliveries} times (max_deliveries={self.settings.max_deliveries}): "
                f"the job may crash workers"))
        if progress.is_cancelled:
            return Decision(Verdict.FINISH, running, event=done_event(running, "cancelled"))
        if job.deadline_ms is not None and not progress.token_ids and time.time() * 1000 > job.deadline_ms:
            return Decision(Verdict.FINISH, running, event=ErrorEvent(
                code="expired", message=f"deadline_ms={job.deadline_ms} passed before the job started"))
        try:
            params = SamplingParams(**job.params.sampling_kwargs())
        except ValueError as exc:
            return Decision(Verdict.REJECT, running, code="invalid_request", message=str(exc))
        finish_reason = self._resumed_finish(running, params)
        if finish_reason is not None:  # the dead worker published every token but not the final event
            return Decision(Verdict.FINISH, running, event=done_event(running, finish_reason))
        return Decision(Verdict.ADMIT, running, params=params)

    def _submit(self, decision: Decision, loop: asyncio.AbstractEventLoop) -> Decision:
        """Hand an admitted job to the engine; what the engine refuses becomes a final event or a hand-back."""
        running, params = decision.running, decision.params
        assert running is not None and params is not None
        job = running.job
        if self._handoff is None or self._handoff.loop is not loop:
            self._handoff = OutputHandoff(loop, self.publisher.queue.put_nowait)
        self.table.add(running)
        try:
            self.engine.submit(
                running.job_id, prompt=job.prompt, prompt_token_ids=job.prompt_token_ids,
                messages=None if job.messages is None else [m.model_dump() for m in job.messages],
                params=params, priority=job.priority, lane_rank=running.entry.lane_rank,
                resume_token_ids=running.token_ids or None,
                on_output=self._handoff)
        except InvalidRequestError as exc:  # includes PromptTooLongError (code "too_long")
            self.table.remove(running.job_id)
            if exc.code == "too_long" and running.num_resumed_tokens:
                return Decision(Verdict.FINISH, running, event=done_event(running, "length"))
            return Decision(Verdict.REJECT, running, code=exc.code, message=str(exc))
        except Exception as exc:  # the engine loop died, or a bug: hand the job to another worker
            self.table.remove(running.job_id)
            logger.exception("job=%s event=submit_failed", running.job_id)
            self.table.abort(running, AbortReason.HANDBACK, repr(exc))
            return Decision(Verdict.HAND_BACK, running)
        return Decision(Verdict.STARTED, running)

    async def _carry_out(self, entry: Entry, job_id: str | None, decision: Decision) -> None:
        """The one place an intake decision reaches Redis (or the log)."""
        verdict, running = decision.verdict, decision.running
        if verdict is Verdict.SKIP:
            if decision.reason:  # a redelivery nobody needs: acknowledge it
                await self.redis.xack(self.keys.shards[entry.shard].lane_jobs(entry.lane), self.keys.group,
                                      entry.entry_id)
                log = logger.info if decision.reason == "already_final" else logger.warning
                log("job=%s event=skip reason=%s entry=%s", job_id, decision.reason, entry.entry_id)
        elif verdict is Verdict.STARTED:
            assert running is not None
            logger.info("job=%s event=%s lane=%s entry=%s deliveries=%d resumed_tokens=%d queue_ms=%d", job_id,
                        "resume" if running.num_resumed_tokens else "start", entry.lane, entry.entry_id,
                        entry.num_deliveries, running.num_resumed_tokens,
                        max(0, int(time.time() * 1000) - entry.enqueued_ms))
        elif verdict is Verdict.FINISH:
            assert running is not None and decision.event is not None
            await self.publisher.finish_now(running, decision.event)
        elif verdict is Verdict.HAND_BACK:
            assert running is not None
            await self.publisher.hand_back_now(running)
        else:
            ttl_s = running.ttl_s if running is not None else None
            await self.publisher.reject(entry, job_id, ttl_s, decision.code, decision.message)

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
