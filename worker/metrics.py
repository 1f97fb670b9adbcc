"""Prometheus metrics of one worker (own registry, so tests can run several workers in one process).

Engine counters are fed from EngineStats snapshots as deltas; queue gauges from XINFO GROUPS."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.queue_lag = Gauge("tokenrelay_queue_lag", "jobs in {p}:jobs not yet delivered to any worker "
                               "(all shards)", registry=r)
        self.queue_pending = Gauge("tokenrelay_queue_pending", "jobs delivered and not yet acknowledged "
                                   "(all shards)", registry=r)
        # Per shard: what an autoscaler (KEDA's Redis Streams scaler, lagCount) reads per stream, and
        # the view that shows one hot or stuck shard (docs/scaling.md).
        self.shard_lag = Gauge("tokenrelay_queue_shard_lag", "jobs of one shard's stream not yet delivered",
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

    def update_queue(self, group_infos: dict[int, dict[str, Any] | None]) -> None:
        """XINFO GROUPS of our group, per shard (None: no group there yet)."""
        total_lag, total_pending, is_lag_known = 0, 0, True
        for shard, info in group_infos.items():
            if info is None:
                continue
            lag = info.get("lag")
            pending = int(info.get("pending") or 0)
            if lag is None:  # Redis reports no lag when it cannot tell (entries deleted mid-stream)
                is_lag_known = False
            else:
                self.shard_lag.labels(shard=str(shard)).set(int(lag))
                total_lag += int(lag)
            self.shard_pending.labels(shard=str(shard)).set(pending)
            total_pending += pending
        if group_infos and is_lag_known:
            self.queue_lag.set(total_lag)
        self.queue_pending.set(total_pending)

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
