"""Prometheus metrics of one gateway (own registry, so tests can run several gateways in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tokenrelay_gateway_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("tokenrelay_gateway_requests_in_flight", "completions being served now",
                               registry=r)
        self.rejected = Counter("tokenrelay_gateway_rejected", "requests turned away with 503, by reason "
                                "(no_worker, queue_full, queue_timeout, redis)", ["reason"], registry=r)
        self.cancelled = Counter("tokenrelay_gateway_cancelled_jobs", "jobs cancelled because their client left",
                                 registry=r)
        self.ttft_s = Histogram("tokenrelay_gateway_time_to_first_token_seconds",
                                "request received -> first event of its job", buckets=_LATENCY_BUCKETS_S,
                                registry=r)
        self.duration_s = Histogram("tokenrelay_gateway_request_duration_seconds",
                                    "request received -> response complete", buckets=_LATENCY_BUCKETS_S,
                                    registry=r)
        self.completion_tokens = Counter("tokenrelay_gateway_completion_tokens", "completion tokens returned",
                                         registry=r)
