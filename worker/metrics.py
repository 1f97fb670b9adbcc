"""Prometheus metrics of one worker (own registry, so tests can run several workers in one process).

Engine counters are fed from EngineStats snapshots as deltas; queue gauges, per lane, from XINFO GROUPS,
XPENDING and the oldest unacknowledged entry (the numbers KEDA's Redis Streams scaler reads)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from engine.stats import EngineStats

logger = logging.getLogger("tokenrelay.worker")

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class MetricsPortError(RuntimeError):
    """/metrics cannot listen where the settings say (`python -m worker` exits 2)."""


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Per lane, summed over the shards (sum() over `lane` is the whole queue).
        self.queue_lag = Gauge("tokenrelay_queue_lag", "jobs in a lane's streams not yet delivered to any worker "
                               "(all shards)", ["lane"], registry=r)
        self.queue_pending = Gauge("tokenrelay_queue_pending", "jobs of a lane delivered and not yet acknowledged "
                                   "(all shards)", ["lane"], registry=r)
        self.queue_depth = Gauge("tokenrelay_queue_depth", "jobs of a lane not finished: lag + pending",
                                 ["lane"], registry=r)
        self.queue_oldest_age_s = Gauge("tokenrelay_queue_oldest_job_age_seconds",
                                        "age of a lane's oldest unacknowledged job (0: none)", ["lane"], registry=r)
        # Per shard, summed over the lanes: what an autoscaler (KEDA's Redis Streams scaler, lagCount)
        # reads per stream, and the view that shows one hot or stuck shard (docs/scaling.md).
        self.shard_lag = Gauge("tokenrelay_queue_shard_lag", "jobs of one shard's streams not yet delivered",
                               ["shard"], registry=r)
        self.shard_pending = Gauge("tokenrelay_queue_shard_pending", "jobs of one shard delivered, not yet "
                                   "acknowledged", ["shard"], registry=r)
        self.jobs_held = Gauge("tokenrelay_worker_jobs", "jobs this worker holds", registry=r)
        self.num_running = Gauge("tokenrelay_engine_running", "sequences running in the engine", registry=r)
        self.num_waiting = Gauge("tokenrelay_engine_waiting", "sequences waiting in the engine", registry=r)
        self.kv_usage = Gauge("tokenrelay_kv_cache_usage", "used KV blocks / total KV blocks", registry=r)
        self.prefix_hit_rate = Gauge("tokenrelay_prefix_cache_hit_rate", "prompt tokens served from cache",
                                     registry=r)
        self.generated_tokens = Counter("tokenrelay_generated_tokens", "tokens generated (rate: tokens/s)",
                                        registry=r)
        self.steps = Counter("tokenrelay_engine_steps", "engine steps", registry=r)
        self.preemptions = Counter("tokenrelay_preemptions", "sequences preempted for KV space", registry=r)
        self.ttft_s = Histogram("tokenrelay_time_to_first_token_seconds", "job received -> first token",
                                buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tpot_s = Histogram("tokenrelay_time_per_output_token_seconds", "mean gap between tokens of a job",
                                buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("tokenrelay_e2e_latency_seconds", "job received -> final event",
                               buckets=_LATENCY_BUCKETS_S, registry=r)
        self.jobs = Counter("tokenrelay_jobs", "jobs finished, by final status", ["status"], registry=r)
        self.errors = Counter("tokenrelay_errors", "error events, by code", ["code"], registry=r)
        self._last: EngineStats | None = None
        self._server: Any = None

    def update_engine(self, stats: EngineStats, num_jobs_held: int) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self.jobs_held.set(num_jobs_held)
        last = self._last
        self.generated_tokens.inc(stats.num_generated_tokens - (last.num_generated_tokens if last else 0))
        self.steps.inc(stats.num_steps - (last.num_steps if last else 0))
        self.preemptions.inc(stats.num_preemptions - (last.num_preemptions if last else 0))
        self._last = stats

    def update_queue(self, states: dict[tuple[str, int], QueueState | None]) -> None:
        """The queue numbers of every (lane, shard) stream (None: no stream or group there yet)."""
        lane_lag: dict[str, int | None] = {}
        lane_pending: dict[str, int] = {}
        lane_oldest: dict[str, int | None] = {}
        shard_lag: dict[int, int | None] = {}
        shard_pending: dict[int, int] = {}
        for (lane, shard), state in states.items():
            if state is None:
                continue
            _add_lag(lane_lag, lane, state.lag)
            _add_lag(shard_lag, shard, state.lag)
            lane_pending[lane] = lane_pending.get(lane, 0) + state.pending
            shard_pending[shard] = shard_pending.get(shard, 0) + state.pending
            if state.oldest_ms is not None:
                old = lane_oldest.get(lane)
                lane_oldest[lane] = state.oldest_ms if old is None else min(old, state.oldest_ms)
            else:
                lane_oldest.setdefault(lane, None)
        for lane, pending in lane_pending.items():
            lag = lane_lag.get(lane)
            if lag is not None:  # Redis reports no lag when it cannot tell (entries deleted mid-stream)
                self.queue_lag.labels(lane=lane).set(lag)
                self.queue_depth.labels(lane=lane).set(lag + pending)
            self.queue_pending.labels(lane=lane).set(pending)
            oldest = lane_oldest.get(lane)
            age_s = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)
            self.queue_oldest_age_s.labels(lane=lane).set(age_s)
        for shard, pending in shard_pending.items():
            lag = shard_lag.get(shard)
            if lag is not None:
                self.shard_lag.labels(shard=str(shard)).set(lag)
            self.shard_pending.labels(shard=str(shard)).set(pending)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        if port > 0:
            try:
                self._server = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:  # taken since the check before the model loaded
                raise MetricsPortError(f"cannot serve /metrics on {host}:{port} ({exc}): set TOKENRELAY_METRICS_PORT "
                                       "to a free port, or 0 to turn /metrics off") from None
            logger.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            server = self._server[0] if isinstance(self._server, tuple) else self._server
            server.shutdown()
            server.server_close()
            self._server = None


@dataclass(frozen=True)
class QueueState:
    """One lane's stream as the consumer group sees it."""

    lag: int | None  # entries not yet delivered (None: Redis cannot tell)
    pending: int  # delivered, not acknowledged
    oldest_ms: int | None  # enqueue time (entry id ms) of the oldest entry not acknowledged; None: none


def _add_lag(lags: dict[Any, int | None], key: Any, lag: int | None) -> None:
    """Sum lags; unknown (None) once any part is unknown."""
    known = lags.get(key, 0)
    lags[key] = None if known is None or lag is None else known + lag


async def queue_state(redis: Redis, stream: str, group: str) -> QueueState | None:
    """The lane's queue numbers, or None when the stream or group does not exist (yet)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return None
    info = next((g for g in groups if g.get("name") in (group, group.encode())), None)
    if info is None:
        return None
    lag = info.get("lag")
    pending = int(info.get("pending") or 0)
    oldest: list[int] = []
    if pending:
        summary: dict[str, Any] = await redis.xpending(stream, group)
        if summary.get("min"):
            oldest.append(_entry_ms(summary["min"]))
    if lag is None or int(lag) > 0:  # the first undelivered entry: the one after last-delivered-id
        last = info.get("last-delivered-id") or b"0-0"
        last_text = last.decode() if isinstance(last, bytes) else str(last)
        first: Any = await redis.xrange(stream, min=f"({last_text}", max="+", count=1)
        if first:
            oldest.append(_entry_ms(first[0][0]))
    return QueueState(None if lag is None else int(lag), pending, min(oldest) if oldest else None)


def _entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])
