"""Worker: the lifecycle of `python -m worker` (startup, run, drain on SIGTERM, hand-back, close).

All Redis I/O runs here in asyncio on the main thread; the engine steps in its own thread and only ever
meets this side through submit/abort and the publisher's queue."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import AuthenticationError, AuthorizationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api_client.connection import RETRYABLE_ERRORS, connect_async
from api_client.keys import Keys
from worker import health
from worker.aio import MAX_BACKOFF_S, cancel_requested, retry_forever
from worker.intake import Intake
from worker.jobs import AbortReason, JobTable, RunningJob
from worker.lua import Scripts
from worker.metrics import Metrics, queue_state
from worker.publisher import Publisher
from worker.recovery import Recovery
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from engine.core_client import EngineFrontend
    from worker.jobs import Entry

logger = logging.getLogger("tokenrelay.worker")

HAND_BACK_TIMEOUT_S = 10.0  # after the drain: time for aborted jobs to reach Redis as hand-backs
LOOP_EXIT_TIMEOUT_S = 5.0  # cancelled background loops must end within this
STUCK_STOP_SLACK_S = 60.0  # a stop still running this long after drain + hand-back dumps every stack
OUTAGE_LOG_EVERY_S = 10.0  # while Redis is down, each loop logs at most this often
LANE_FULL_BLOCK_MS = 10  # the read's BLOCK while some lane has no room (its seats free without a wake-up)
# Every Redis failure (incl. a cluster between a master's death and its replica's promotion)...
_REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError, *RETRYABLE_ERRORS)
# ...and those that heal by waiting (not a refused command or credentials).
_UNREACHABLE_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError,
                                                    *RETRYABLE_ERRORS)
_INTAKE_RETRY = retry_forever(0.05, _REDIS_ERRORS)


class StartupStoppedError(Exception):
    """A stop signal arrived while the startup still waited for Redis: nothing was served yet."""


class Worker:
    def __init__(self, settings: WorkerSettings, engine: EngineFrontend | None = None, *, burst: bool = False,
                 incarnation: str | None = None) -> None:
        if engine is None:
            engine = _build_engine(settings)  # loads the model: slow
        self.settings = settings
        self.engine = engine
        self.burst = burst
        # This run's token in the heartbeat: tells our own heartbeat from another run's under one name.
        self.incarnation = incarnation or uuid.uuid4().hex
        self.keys = settings.keys
        self.redis: Any = connect_async(
            settings.redis_url, cluster=settings.redis_cluster, socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s, health_check_interval=30)
        self.scripts = Scripts(self.redis, self.keys, settings.consumer)
        self.metrics = Metrics()
        self.table = JobTable(abort_request=engine.abort)
        self.publisher = Publisher(self.redis, self.keys, self.scripts, self.table, engine, self.metrics,
                                   settings.result_ttl_s)
        self.intake = Intake(self.redis, settings, self.table, engine, self.publisher)
        self.recovery = Recovery(self.redis, self.keys, self.scripts, settings.consumer, settings.lease_ms)
        self.exit_code = 0
        self.celery_door: Any = None  # worker.celery_door.CeleryDoor when celery_queue is set
        self._stopping = asyncio.Event()
        self._fast_stop = False  # a second signal: skip the drain, hand everything back now
        self._last_num_steps = -1  # engine steps at the last heartbeat...
        self._last_progress_s = time.monotonic()  # ...and when the engine was last seen stepping or idle

    # ---- lifecycle ---------------------------------------------------------------------------
    def request_stop(self, exit_code: int = 0) -> None:
        if self._stopping.is_set():
            self._fast_stop = True
        self.exit_code = self.exit_code or exit_code
        if not self._stopping.is_set():
            # If the stop itself gets stuck, the log says where (every thread's stack), unprompted.
            faulthandler.dump_traceback_later(self.settings.drain_timeout_s + 2 * HAND_BACK_TIMEOUT_S
                                              + STUCK_STOP_SLACK_S)
        self._stopping.set()

    @property
    def is_stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> int:
        """Serve until stopped (signal, burst done, or the engine died); returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop)
        self.engine.start()
        try:
            await self._startup()
        except StartupStoppedError:  # SIGTERM while Redis was still unreachable: a clean stop
            logger.info("stopped before Redis answered; nothing was served")
            await self._close_unserved()
            return self.exit_code
        except BaseException:  # e.g. wrong credentials: nothing was served, but the engine runs
            await self._close_unserved()
            raise
        publisher = asyncio.create_task(self.publisher.run(), name="publisher")
        loops = [asyncio.create_task(coro, name=name) for name, coro in (
            ("intake", self._intake_loop()),
            ("renew", self._every(self.settings.lease_s / 3, self._renew)),
            ("reclaim", self._every(self.settings.lease_s / 3, self._reclaim)),
            ("trim", self._every(self.settings.lease_s, self._trim)),
            ("cancel", self._every(self.settings.cancel_check_ms / 1000, self._check_cancel)),
            ("heartbeat", self._every(self.settings.heartbeat_ttl_s / 3, self._heartbeat)),
            ("metrics", self._every(self.settings.metrics_interval_s, self._update_metrics)),
            ("watchdog", self._every(0.5, self._watch_engine)),
        )]
        try:
            await self._stopping.wait()
            # Celery tasks still waiting go back to their broker while our own jobs drain.
            door_stopped = asyncio.create_task(self._stop_celery_door())
            await self._drain(loops[0])
            await door_stopped
            await self._hand_back_rest()
        finally:
            for task in loops:
                task.cancel()
            self.publisher.queue.put_nowait(None)
            try:
                await asyncio.wait_for(publisher, HAND_BACK_TIMEOUT_S)
            except (TimeoutError, RedisError, OSError):
                logger.warning("publisher did not finish; %d jobs stay pending for another worker",
                               len(self.table))
            _, stuck = await asyncio.wait(loops, timeout=LOOP_EXIT_TIMEOUT_S)
            if stuck:
                logger.error("loops did not stop when cancelled: %s", sorted(t.get_name() for t in stuck))
            await self.close()
            faulthandler.cancel_dump_traceback_later()
        return self.exit_code

    async def _startup(self) -> None:
        self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        await self._retrying("startup", self.intake.ensure_group)
        # Before anything is read or claimed: one live worker per consumer name (see worker/health.py).
        await self._retrying("startup", self._claim_consumer_name)
        if self.settings.celery_queue:
            from worker.celery_door import start_celery_door

            self.celery_door = await asyncio.to_thread(start_celery_door, self.settings)
        await self._warn_other_layout()
        own = cast("list[Entry]", await self._retrying("startup", self.recovery.claim_own_pending))
        if own:
            await self.intake.admit(own)
        logger.info("worker ready consumer=%s prefix=%s max_num_seqs=%d lease_s=%s burst=%s",
                    self.settings.consumer, self.settings.prefix, self.settings.max_num_seqs,
                    self.settings.lease_s, self.burst)

    async def _warn_other_layout(self) -> None:
        """Jobs waiting under the other key layout (v1 vs hash-tagged) are jobs of producers configured
        otherwise (TOKENRELAY_QUEUE_SHARDS / TOKENRELAY_REDIS_CLUSTER): nobody reads them. Say so."""
        keys = self.keys
        other = Keys(keys.prefix).jobs if keys.is_tagged else Keys(keys.prefix, num_shards=2).shards[0].jobs
        with contextlib.suppress(RedisError, *RETRYABLE_ERRORS):
            waiting = await self.redis.xlen(other)
            if waiting:
                logger.warning("%d entries wait in %s, which this worker does not read (redis_cluster=%s "
                               "queue_shards=%d): give producers and workers the same layout", waiting, other,
                               keys.cluster, keys.num_shards)

    async def _drain(self, intake: asyncio.Task[None]) -> None:
        """Stop taking work (the intake finishes its current read), let running jobs end in time."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(intake, self.settings.block_ms / 1000 + self.settings.socket_timeout_s)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        if self.table and not self._fast_stop:
            logger.info("draining %d jobs (drain_timeout_s=%s)", len(self.table), self.settings.drain_timeout_s)
        while self.table and not self._fast_stop and time.monotonic() < deadline:
            await self.table.wait_changed(min(0.2, max(0.0, deadline - time.monotonic())))

    async def _hand_back_rest(self) -> None:
        """Abort what is still running; the publisher flushes its tokens and re-queues each job at
        the tail of {p}:jobs (re-XADD + XACK in one script), so another worker starts it at once and
        resumes after the published tokens."""
        for job in self.table:
            self.table.abort(job, AbortReason.HANDBACK)  # unless it is ending for another reason already
        deadline = time.monotonic() + HAND_BACK_TIMEOUT_S
        while self.table and time.monotonic() < deadline:
            await self.table.wait_changed(0.2)

    async def _stop_celery_door(self) -> None:
        door, self.celery_door = self.celery_door, None
        if door is not None:
            await asyncio.to_thread(door.stop)

    async def _close_unserved(self) -> None:
        """Close after a startup that served nothing (no heartbeat of ours to remove)."""
        self.metrics.close()
        await asyncio.to_thread(self.engine.shutdown)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()

    async def close(self) -> None:
        await self._stop_celery_door()
        with contextlib.suppress(RedisError, OSError):
            await health.clear(self.redis, self.keys, self.settings.consumer, self.incarnation)
        self.metrics.close()
        await asyncio.to_thread(self.engine.shutdown)
        await self.redis.aclose()
        logger.info("worker stopped consumer=%s exit_code=%d", self.settings.consumer, self.exit_code)

    # ---- loops -------------------------------------------------------------------------------
    async def _intake_loop(self) -> None:
        while not self.is_stopping:
            try:
                await _INTAKE_RETRY.call_with_retry(self._intake_once, self._intake_unreachable)
            except _REDIS_ERRORS:
                continue  # stopping: the loop ends
            except Exception:  # a bug must not stop the intake for good
                logger.exception("intake failed; retrying in %.2fs", MAX_BACKOFF_S)
                await asyncio.sleep(MAX_BACKOFF_S)
        # Shard reads still in flight deliver to us: serve what they read (the drain hands it back).
        try:
            rest = await self.intake.reader.finish()
            if rest:
                await self.intake.admit(rest)
        finally:
            self.intake.reader.cancel()

    async def _intake_once(self) -> None:
        room = self.intake.room_by_lane()
        if not any(room.values()):
            await self.table.wait_changed(self.settings.block_ms / 1000)
            return
        block_ms = min(self.settings.block_ms, 200) if self.burst else self.settings.block_ms
        if not all(room.values()):
            # A full lane's seat frees without a stream entry to wake the blocking read of the others:
            # wake often enough to fill it.
            block_ms = min(block_ms, LANE_FULL_BLOCK_MS)
        entries = await self.intake.read(room, block_ms)
        if entries:
            await self.intake.admit(entries)
        elif self.burst and not self.table and await self._queue_is_idle():
            logger.info("burst: queue empty and nothing running: stopping")
            self.request_stop()

    async def _intake_unreachable(self, exc: Exception) -> None:
        if cancel_requested():
            raise asyncio.CancelledError from exc
        if self.is_stopping:
            raise exc
        # Entries read but not admitted stay in our PEL: XAUTOCLAIM picks them up after lease_s.
        logger.warning("intake: %s; retrying", exc)

    async def _queue_is_idle(self) -> bool:
        entries = await self.recovery.reclaim(self.intake.room_by_lane())
        if entries:
            await self.intake.admit(entries)
            return False
        return not await self.recovery.has_pending()

    async def _renew(self) -> None:
        for job_id in await self.recovery.renew(self.table):
            job = self.table.get(job_id)
            if job is not None and self.table.abort(job, AbortReason.LOST):
                logger.warning("job=%s event=lost reason=lease_taken_over", job_id)

    async def _reclaim(self) -> None:
        if not self.is_stopping:
            entries = await self.recovery.reclaim(self.intake.room_by_lane())
            if entries:
                await self.intake.admit(entries)

    async def _trim(self) -> None:
        """Drop served entries from every (lane, shard) job stream. Delivery is in id order, so every entry
        older than both the group's last delivered entry and its oldest pending one has been acknowledged."""
        for stream in (s for shard in self.keys.shards for s in shard.lane_streams.values()):
            groups = await self.redis.xinfo_groups(stream)
            group = next((g for g in groups if _text(g.get("name")) == self.keys.group), None)
            if group is None:
                continue
            threshold = _text(group["last-delivered-id"])
            pending = await self.redis.xpending(stream, self.keys.group)
            if pending["pending"]:
                threshold = min(threshold, _text(pending["min"]), key=_stream_id)
            if threshold != "0-0":
                await self.redis.xtrim(stream, minid=threshold, approximate=False)

    async def _check_cancel(self) -> None:
        """One MGET for every running job's cancel key; deadlines of jobs not started yet."""
        jobs = [job for job in self.table if job.abort_reason is None]
        if not jobs:
            return
        flags = await self._cancel_flags(jobs)
        now_ms = time.time() * 1000
        for job, flag in zip(jobs, flags, strict=True):
            reason = None
            if flag is not None:
                reason = AbortReason.CANCELLED
            elif job.job.deadline_ms is not None and not job.token_ids and now_ms > job.job.deadline_ms:
                reason = AbortReason.EXPIRED
            if reason is not None and self.table.abort(job, reason):
                logger.info("job=%s event=abort reason=%s", job.job_id, reason.value)

    async def _cancel_flags(self, jobs: list[RunningJob]) -> list[Any]:
        """Each job's cancel key, one MGET per shard (an MGET cannot span cluster slots)."""
        by_shard: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_shard.setdefault(job.entry.shard, []).append(i)
        if len(by_shard) == 1:
            return list(await self.redis.mget([self.keys.cancel(job.job_id) for job in jobs]))
        flags: list[Any] = [None] * len(jobs)
        async with self.redis.pipeline(transaction=False) as pipe:
            for indexes in by_shard.values():
                # execute_command: a cluster pipeline refuses its mget method (one slot per MGET here).
                pipe.execute_command("MGET", *[self.keys.cancel(jobs[i].job_id) for i in indexes])
            replies = await pipe.execute()
        for indexes, values in zip(by_shard.values(), replies, strict=True):
            for i, value in zip(indexes, values, strict=True):
                flags[i] = value
        return flags

    def _heartbeat_value(self) -> str:
        stats = self.engine.stats()
        # Stalled: the engine owes outputs (sequences in it, or jobs of ours not yet finishing) and its
        # step count has not moved since the last heartbeat. `--check` fails past health_stall_s.
        now = time.monotonic()
        has_work = stats.num_running + stats.num_waiting > 0 or any(not job.is_finishing for job in self.table)
        if not has_work or stats.num_steps != self._last_num_steps:
            self._last_progress_s = now
        self._last_num_steps = stats.num_steps
        return health.heartbeat_value(self.settings.consumer, self.incarnation, len(self.table), stats,
                                      stalled_s=now - self._last_progress_s, model=self.settings.served_model)

    async def _claim_consumer_name(self) -> None:
        await health.claim(self.redis, self.keys, self.settings.consumer, self.incarnation,
                           self.settings.heartbeat_ttl_s, self._heartbeat_value())

    async def _heartbeat(self) -> None:
        if await health.beat(self.redis, self.keys, self.settings.consumer, self.incarnation,
                             self.settings.heartbeat_ttl_s, self._heartbeat_value()):
            return
        if not self.is_stopping:  # e.g. our event loop stalled past the TTL and another run took the name
            logger.error("consumer name %s was taken by another run of a worker (its heartbeat replaced ours): "
                         "stopping, so that no job is served twice under one name", self.settings.consumer)
            self.request_stop(exit_code=2)

    async def _update_metrics(self) -> None:
        self.metrics.update_engine(self.engine.stats(), len(self.table))
        states = {}
        for shard in self.keys.shards:
            for lane, stream in shard.lane_streams.items():
                states[lane, shard.index] = await queue_state(self.redis, stream, self.keys.group)
        self.metrics.update_queue(states)

    async def _watch_engine(self) -> None:
        if self.engine.error is not None and not self.is_stopping:
            logger.error("the engine loop died (%r): handing jobs back and exiting", self.engine.error)
            self.request_stop(exit_code=1)

    @staticmethod
    async def _every(interval_s: float, body: Callable[[], Awaitable[None]]) -> None:
        """Run `body` every interval until cancelled (leases, cancel checks and heartbeats must go on
        while draining); a Redis error is logged, never fatal. During an outage a loop that runs every
        20 ms would write 50 lines a second: it logs the first failure, then one line per
        OUTAGE_LOG_EVERY_S with the count, and one line when Redis answers again."""
        name = getattr(body, "__name__", "loop")
        failures, last_logged_s = 0, 0.0
        while True:
            try:
                await body()
                if failures:
                    logger.info("%s: Redis answers again after %d failed attempts", name, failures)
                    failures = 0
            except _REDIS_ERRORS as exc:
                if cancel_requested():
                    raise asyncio.CancelledError from exc
                failures += 1
                now = time.monotonic()
                if failures == 1 or now - last_logged_s >= OUTAGE_LOG_EVERY_S:
                    logger.warning("%s: %s (%d failed attempts so far)", name, exc, failures)
                    last_logged_s = now
            except Exception:
                logger.exception("%s failed", name)
            await asyncio.sleep(interval_s)

    async def _retrying(self, what: str, body: Callable[[], Awaitable[object]]) -> object:
        """Run `body` until Redis answers it. A stop signal meanwhile ends the wait at once with
        StartupStoppedError (a connect to an unreachable host can take socket_timeout_s)."""
        backoff_s = 0.1
        while True:
            attempt = asyncio.ensure_future(body())
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait((attempt, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                if cancel_requested():  # run() itself is cancelled: leave no attempt behind
                    attempt.cancel()
            if not attempt.done():
                attempt.cancel()
                with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                    await attempt
                raise StartupStoppedError(what)
            try:
                return attempt.result()
            except (AuthenticationError, AuthorizationError):
                raise  # wrong credentials never heal by waiting: `python -m worker` exits 2
            except _UNREACHABLE_ERRORS as exc:
                if cancel_requested():
                    raise
                if self.is_stopping:
                    raise StartupStoppedError(what) from exc
                logger.warning("%s: Redis unreachable (%s); retrying in %.1fs", what, exc, backoff_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)


def _build_engine(settings: WorkerSettings) -> EngineFrontend:
    config = settings.to_engine_config()
    # The line a person (and the SIGTERM-while-loading test) sees before the slow part starts.
    logger.info("loading model=%s device=%s engine_process=%s", config.model or "(embedded default)",
                config.device, settings.engine_process)
    if settings.engine_process:
        from engine.mp_engine import MPEngine

        return MPEngine(config)
    from engine.async_engine import AsyncEngine

    return AsyncEngine(config)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
