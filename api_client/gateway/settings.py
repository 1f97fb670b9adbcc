"""GatewaySettings: every knob of `python -m api_client.gateway`, read once from TOKENRELAY_* variables.

Redis URL and prefix are the workers' own settings (the gateway must name the same queue); the rest
start with GATEWAY_ so one .env file can hold the workers' and the gateway's settings."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api_client.keys import DEFAULT_PREFIX, MAX_SHARDS, Keys

ENV_PREFIX = "TOKENRELAY_"


@dataclass(frozen=True)
class ApiKey:
    name: str  # what the job records (api_key_id); never the key itself
    digest: bytes  # sha256 of the key: requests are compared against it in constant time


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # ---- Redis -------------------------------------------------------------------------------
    redis_url: str = Field(default="redis://localhost:6379/0", description=(
        "Redis URL of the workers' queue: redis://, rediss:// (TLS) or unix://"))
    prefix: str = Field(default=DEFAULT_PREFIX, description="key prefix {p}: the workers' prefix")
    redis_cluster: bool = Field(default=False, description=(
        "Redis Cluster (redis-py's cluster client from redis_url, any node): the workers' setting"))
    queue_shards: int = Field(default=1, ge=1, le=MAX_SHARDS, description="the workers' queue_shards")
    socket_timeout_s: float = Field(default=10.0, gt=0, description="Redis socket timeout")

    # ---- HTTP --------------------------------------------------------------------------------
    gateway_host: str = Field(default="127.0.0.1", description="address the gateway listens on")
    gateway_port: int = Field(default=8000, ge=0, le=65535, description="port the gateway listens on")
    gateway_api_keys: str | None = Field(default=None, description=(
        "comma-separated Bearer keys, each `key` or `name=key` (the job records the name); unset: "
        "no key, loopback clients only"))
    gateway_allow_unauthenticated: bool = Field(default=False, description=(
        "with no API keys, serve clients from any address (behind a proxy that authenticates)"))

    # ---- jobs --------------------------------------------------------------------------------
    gateway_queue_timeout_s: float = Field(default=30.0, gt=0, description=(
        "a job no worker has started within this gets 503 (and is cancelled)"))
    gateway_max_queue_depth: int = Field(default=1000, ge=0, description=(
        "503 while more jobs than this wait undelivered in {p}:jobs; 0: no limit"))
    gateway_retry_after_s: int = Field(default=5, ge=1, description="Retry-After of a 503, in seconds")
    gateway_default_max_tokens: int | None = Field(default=None, ge=1, description=(
        "max_tokens of a request that gives none; unset: until EOS or the end of the model's context"))

    # ---- the Batch API (/v1/files, /v1/batches) ----------------------------------------------
    gateway_max_file_bytes: int = Field(default=64 << 20, ge=1, description=(
        "largest batch input file POST /v1/files accepts (it is kept in Redis)"))
    gateway_file_ttl_s: int = Field(default=7 * 86_400, ge=60, description=(
        "uploaded and produced files, and finished batches, expire after this"))
    gateway_batch_poll_s: float = Field(default=0.5, gt=0, description="how often the collector reads open batches")
    gateway_batch_lock_ttl_s: float = Field(default=10.0, gt=0, description=(
        "a replica that stops collecting a batch (it died) hands it to another after this"))

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        self.keys  # raises ValueError naming the bad prefix  # noqa: B018
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        self.api_keys()  # raises on a malformed entry
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix, num_shards=self.queue_shards, cluster=self.redis_cluster)

    def api_keys(self) -> tuple[ApiKey, ...]:
        """The configured keys. A bare key is named by a prefix of its hash."""
        keys: list[ApiKey] = []
        for entry in (self.gateway_api_keys or "").split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, key = entry.partition("=")
            if not sep:
                name, key = "", entry
            if not key or (sep and not name):
                raise ValueError("gateway_api_keys: each entry is `key` or `name=key`, none of them empty")
            digest = hashlib.sha256(key.encode()).digest()
            keys.append(ApiKey(name or f"key-{digest.hex()[:8]}", digest))
        return tuple(keys)

    @property
    def is_loopback_only(self) -> bool:
        """No key configured and not opened: only clients on this host are served."""
        return not self.api_keys() and not self.gateway_allow_unauthenticated


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
