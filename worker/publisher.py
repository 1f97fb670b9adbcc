"""Publisher: engine outputs -> {p}:result:{id} (pipelined, coalesced when it falls behind) -> XACK.

It owns every write to result streams: token deltas, the one final event per job (then the ack),
error events with their {p}:dead letters, and hand-backs at shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from api_client.connection import RETRYABLE_ERRORS
from api_client.keys import Keys
from api_client.schema import DoneEvent, ErrorEvent, Job, TokenEvent, dump_event
from engine.outputs import FinishReason, RequestOutput
from worker import lua
from worker.aio import cancel_requested, retry_forever
from worker.jobs import AbortReason, Entry, JobTable, RunningJob, done_event
from worker.metrics import Metrics

if TYPE_CHECKING:
    from engine.core_client import EngineFrontend

logger = logging.getLogger("tokenrelay.worker")

# A batch that Redis could not take is sent again for as long as the outage lasts (every script is
# idempotent).
_SEND_RETRY = retry_forever(0.05, (*RETRYABLE_ERRORS, OSError))
# Token deltas per script call: a batch of 256 jobs is one or two calls; each call's run time on the
# server (~20 us a job) stays well under a millisecond so other clients are not held up.
TOKENS_PER_CALL = 128


@dataclass
class _Delta:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None


@dataclass
class _Op:
    kind: str  # "tokens" | "final" | "hand_back" | "dead" (a dead letter for a job without a readable id)
    job: RunningJob
    delta: _Delta | None = None
    event: DoneEvent | ErrorEvent | None = None
    dead: bool = False  # the final event comes with a {p}:dead letter


class Publisher:
    def __init__(self, redis: Any, keys: Keys, scripts: lua.Scripts, table: JobTable, engine: EngineFrontend,
                 metrics: Metrics, default_ttl_s: int) -> None:
        self.redis = redis
        self.default_ttl_s = default_ttl_s
        self.keys = keys
        self.scripts = scripts
        self.table = table
        self.engine = engine
        self.metrics = metrics
        self.queue: asyncio.Queue[RequestOutput | None] = asyncio.Queue()  # None: stop
        self.num_batches = 0
        self.num_outputs = 0

    async def run(self) -> None:
        """Publish until a None arrives. Each batch is whatever queued up while the last one was sent,
        so deltas coalesce exactly when Redis is slower than the engine."""
        while True:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            outputs = [o for o in items if o is not None]
            try:
                if outputs:
                    await self._send(self._build(outputs))
            except Exception as exc:  # a bug or an unexpected reply: no job of this batch may linger
                logger.exception("publisher: batch of %d outputs failed", len(outputs))
                self._release({out.request_id for out in outputs}, exc)
            if len(outputs) != len(items):
                return

    def _release(self, job_ids: set[str], exc: Exception) -> None:
        """Jobs whose batch failed midway: what was written is unknown, and their token counts ran ahead
        of it. Stop them and free their slots, writing nothing more; their entries stay pending, so
        after lease_s a worker (maybe this one) takes each over and resumes from its result stream."""
        for job_id in job_ids:
            job = self.table.get(job_id)
            if job is None:
                continue
            logger.error("job=%s event=released reason=publish_failed error=%r", job_id, exc)
            if not job.is_finishing:  # still generating: stop it (its final output is then ignored)
                self.table.abort(job, AbortReason.LOST, f"publishing failed: {exc!r}")
            self.table.remove(job_id)

    # ---- batches from engine outputs ---------------------------------------------------------
    def _build(self, outputs: list[RequestOutput]) -> list[_Op]:
        self.num_outputs += len(outputs)
        deltas: dict[str, _Op] = {}
        finals: list[_Op] = []
        for out in outputs:
            job = self.table.get(out.request_id)
            if job is None:
                continue
            if job.abort_reason is AbortReason.LOST:  # another worker owns it now: write nothing
                if out.finished:
                    self.table.remove(job.job_id)
                continue
            job.num_prompt_tokens = out.num_prompt_tokens or job.num_prompt_tokens
            if out.token_ids:
                self._append(job, out, deltas)
            if out.finished:
                job.is_finishing = True
                op = self._final_op(job, out)
                if op is None:
                    self.table.remove(job.job_id)
                else:
                    finals.append(op)
        return [*deltas.values(), *finals]

    def _append(self, job: RunningJob, out: RequestOutput, deltas: dict[str, _Op]) -> None:
        now = time.monotonic()
        if job.first_token_s is None:
            job.first_token_s = now
            self.metrics.ttft_s.observe(now - job.received_s)
        job.last_token_s = now
        op = deltas.get(job.job_id)
        if op is None:
            op = deltas[job.job_id] = _Op("tokens", job, delta=_Delta(index=len(job.token_ids)))
        delta = op.delta
        assert delta is not None
        delta.token_ids.extend(out.token_ids)
        delta.text += out.text
        if out.logprobs is not None:
            delta.logprobs = [*(delta.logprobs or []), *out.logprobs]
        job.token_ids.extend(out.token_ids)
        job.text_parts.append(out.text)

    def _final_op(self, job: RunningJob, out: RequestOutput) -> _Op | None:
        reason = job.abort_reason
        if out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):  # ended on its own before an abort landed
            return _Op("final", job, event=done_event(job, FinishReason(out.finish_reason).value))
        if out.finish_reason == FinishReason.ERROR:
            if self.engine.error is not None:  # the engine died: another worker can still serve it
                return _Op("hand_back", job)
            return _Op("final", job, event=ErrorEvent(code="internal", message=out.error or "engine error"),
                       dead=True)
        if reason is AbortReason.CANCELLED:
            return _Op("final", job, event=done_event(job, "cancelled"))
        if reason is AbortReason.EXPIRED:
            return _Op("final", job, event=ErrorEvent(
                code="expired", message=f"deadline_ms={job.job.deadline_ms} passed before the job started"))
        if reason is AbortReason.HANDBACK:
            return _Op("hand_back", job)
        message = job.error_message or "the engine aborted the job"
        return _Op("final", job, event=ErrorEvent(code="internal", message=message), dead=True)

    # ---- sending -------------------------------------------------------------------------------
    async def _send(self, ops: list[_Op]) -> None:
        """One pipeline per batch; on a connection error the same batch is sent again (every script
        is idempotent: a repeated delta or final event is refused as already written)."""
        while ops:
            commands, replies = await _SEND_RETRY.call_with_retry(
                functools.partial(self._execute, ops), functools.partial(self._send_failed, len(ops)))
            self.num_batches += 1
            retries = []
            for answered, reply in zip(commands, replies, strict=True):
                for op, op_reply in zip(answered, _split_reply(answered, reply), strict=True):
                    if (retry := self._handle(op, op_reply)) is not None:
                        retries.append(retry)
            ops = retries

    async def _execute(self, ops: list[_Op]) -> tuple[list[list[_Op]], list[Any]]:
        for attempt in range(2):
            # `async with` resets the pipeline (returns its connection) even when execute raises.
            async with self.redis.pipeline(transaction=False) as pipe:
                commands = await self._queue_ops(pipe, ops)
                replies = await pipe.execute(raise_on_error=False)
            # A cluster pipeline sends EVALSHA as is: a node without the script (restarted, or a replica
            # just promoted by a failover) answers NOSCRIPT. Load them everywhere and send the batch again
            # (every script is idempotent).
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                logger.warning("publisher: a Redis node lost the scripts; loading them again")
                await self.scripts.load(self.redis)
                continue
            break
        # A cluster pipeline answers per node: one node down (a failover under way) fails only its
        # commands. Send the whole batch again later rather than fail those jobs.
        lost = next((r for r in replies if isinstance(r, RETRYABLE_ERRORS)), None)
        if lost is not None:
            raise lost
        return commands, replies

    @staticmethod
    async def _send_failed(num_ops: int, exc: Exception) -> None:
        if cancel_requested():
            raise asyncio.CancelledError from exc
        logger.warning("publisher: Redis unreachable (%s); retrying %d writes", exc, num_ops)

    async def _queue_ops(self, pipe: Any, ops: list[_Op]) -> list[list[_Op]]:
        """Queue the batch: every token delta in a few script calls (TOKENS_PER_CALL jobs each),
        then the other ops one call each. Returns the ops each queued command answers for."""
        commands: list[list[_Op]] = []
        by_stream: dict[tuple[int, str], list[_Op]] = {}  # one call checks one (shard, lane) stream: one slot
        for op in ops:
            if op.kind == "tokens":
                by_stream.setdefault((op.job.entry.shard, op.job.entry.lane), []).append(op)
        for (shard, lane), token_ops in by_stream.items():
            for start in range(0, len(token_ops), TOKENS_PER_CALL):
                chunk = token_ops[start:start + TOKENS_PER_CALL]
                keys, args = self.scripts.tokens_many_args(self.keys.shards[shard],
                                                           [self._delta_args(op) for op in chunk], lane)
                await self.scripts.queue(pipe, self.scripts.publish_tokens_many, keys, args)
                commands.append(chunk)
        for op in ops:
            if op.kind != "tokens":
                await self._queue_op(pipe, op)
                commands.append([op])
        return commands

    def _delta_args(self, op: _Op) -> tuple[str, str, int, int, str, int]:
        job, delta = op.job, op.delta
        assert delta is not None
        event = TokenEvent(index=delta.index, token_ids=delta.token_ids, text=delta.text, logprobs=delta.logprobs)
        return (job.job_id, job.entry.entry_id, delta.index, len(delta.token_ids), dump_event(event), job.ttl_s)

    async def _queue_op(self, pipe: Any, op: _Op) -> None:
        job = op.job
        shard, lane = self.keys.shards[job.entry.shard], job.entry.lane
        if op.kind == "final":
            assert op.event is not None
            expect = len(job.token_ids) if isinstance(op.event, DoneEvent) else -1
            dead = None
            if op.dead and isinstance(op.event, ErrorEvent):
                dead = (job.entry.raw or b"", job.job_id, op.event.code, op.event.message)
            keys, args = self.scripts.final_args(shard, job.job_id, job.entry.entry_id, dump_event(op.event),
                                                 job.ttl_s, expect, dead, lane)
            await self.scripts.queue(pipe, self.scripts.publish_final, keys, args)
        elif op.kind == "dead":
            assert isinstance(op.event, ErrorEvent)
            keys, args = self.scripts.dead_letter_args(shard, job.entry.entry_id, job.entry.raw or b"", "",
                                                       op.event.code, op.event.message, lane)
            await self.scripts.queue(pipe, self.scripts.dead_letter, keys, args)
        else:
            keys, args = self.scripts.hand_back_args(shard, job.entry.entry_id, job.entry.raw or b"", job.job_id,
                                                     job.entry.num_deliveries - 1, lane)
            await self.scripts.queue(pipe, self.scripts.hand_back, keys, args)

    def _handle(self, op: _Op, reply: Any) -> _Op | None:
        """Act on one script reply; returns an op to send again, if any."""
        job = op.job
        if isinstance(reply, Exception):
            logger.error("job=%s event=write_failed kind=%s error=%s", job.job_id, op.kind, reply)
            if op.kind == "tokens":
                self.table.abort(job, AbortReason.INTERNAL, f"could not write to the result stream: {reply}")
            else:  # left pending: after lease_s another worker (or we) take it over
                self.table.remove(job.job_id)
            return None
        if op.kind == "tokens":
            code = int(reply[0])
            if code == lua.ERROR:
                logger.error("job=%s event=write_failed kind=tokens error=script_error", job.job_id)
                self.table.abort(job, AbortReason.INTERNAL, "could not write to the result stream (script error)")
            elif code in (lua.FINAL_EXISTS, lua.NOT_OWNER, lua.OVERLAP):
                # OVERLAP: another entry with the same job id (a producer sent it twice) is further
                # ahead; it owns the stream now and our entry is acked once its final event exists.
                logger.warning("job=%s event=lost reason=%s", job.job_id,
                               {lua.FINAL_EXISTS: "final_exists", lua.NOT_OWNER: "not_owner"}.get(code, "overlap"))
                self.table.abort(job, AbortReason.LOST)
            elif code == lua.GAP:
                self.table.abort(job, AbortReason.INTERNAL, f"result stream out of step: next index "
                                 f"{int(reply[1])}, delta at {op.delta.index if op.delta else -1}")
            return None
        code = int(reply)
        if op.kind == "final" and code == lua.GAP:
            # The done event would not match the published tokens: end the job with an error instead.
            return _Op("final", job, event=ErrorEvent(
                code="internal", message="published tokens do not match the completion"), dead=True)
        self.table.remove(job.job_id)
        if op.kind == "hand_back":
            logger.info("job=%s event=handback written=%s tokens=%d", job.job_id, code == lua.WRITTEN,
                        len(job.token_ids))
        elif op.kind == "dead":
            assert isinstance(op.event, ErrorEvent)
            self.metrics.errors.labels(code=op.event.code).inc()
            self.metrics.jobs.labels(status="error").inc()
        elif code == lua.WRITTEN:
            assert op.event is not None
            self._finished(job, op.event)
        else:
            logger.info("job=%s event=skip reason=%s", job.job_id,
                        "already_final" if code == lua.ALREADY else "not_owner")
        return None

    def _finished(self, job: RunningJob, event: DoneEvent | ErrorEvent) -> None:
        now = time.monotonic()
        e2e_s = now - job.received_s
        num_new = len(job.token_ids) - job.num_resumed_tokens
        self.metrics.e2e_s.observe(e2e_s)
        if job.first_token_s is not None and job.last_token_s is not None and num_new > 1:
            self.metrics.tpot_s.observe((job.last_token_s - job.first_token_s) / (num_new - 1))
        ttft_ms = -1 if job.first_token_s is None else int((job.first_token_s - job.received_s) * 1000)
        if isinstance(event, DoneEvent):
            self.metrics.jobs.labels(status=event.finish_reason).inc()
            logger.info("job=%s event=done finish=%s tokens=%d resumed=%d ttft_ms=%d e2e_ms=%d", job.job_id,
                        event.finish_reason, len(job.token_ids), job.num_resumed_tokens, ttft_ms,
                        int(e2e_s * 1000))
        else:
            self.metrics.jobs.labels(status="error").inc()
            self.metrics.errors.labels(code=event.code).inc()
            logger.info("job=%s event=error code=%s tokens=%d e2e_ms=%d message=%r", job.job_id, event.code,
                        len(job.token_ids), int(e2e_s * 1000), event.message)

    # ---- final events for jobs that never reach the engine ---------------------------------------
    async def finish_now(self, job: RunningJob, event: DoneEvent | ErrorEvent, dead: bool = False) -> None:
        await self._send([_Op("final", job, event=event, dead=dead)])

    async def hand_back_now(self, job: RunningJob) -> None:
        await self._send([_Op("hand_back", job)])

    async def reject(self, entry: Entry, job_id: str | None, ttl_s: int | None, code: str, message: str) -> None:
        """A job that cannot be served: error event (when its id is known), {p}:dead letter, ack."""
        logger.info("job=%s event=rejected code=%s entry=%s message=%r", job_id or "-", code,
                    entry.entry_id, message[:300])
        job = RunningJob(job_id or "", entry, Job.model_construct(), ttl_s or self.default_ttl_s)
        event = ErrorEvent(code=code, message=message)  # type: ignore[arg-type]
        await self._send([_Op("final" if job_id else "dead", job, event=event, dead=True)])


def _split_reply(answered: list[_Op], reply: Any) -> list[Any]:
    """One command's reply -> one reply per op it answers for: a token call's flat
    [code_1, next_1, code_2, next_2, ...] becomes [code, next] pairs; an error reaches every op."""
    if isinstance(reply, Exception) or answered[0].kind != "tokens":
        return [reply] * len(answered)
    return [reply[2 * i:2 * i + 2] for i in range(len(answered))]
