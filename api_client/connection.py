"""Redis connections for producers, the gateway, the worker and the Celery door: a plain Redis, or
redis-py's Redis Cluster client (any node's URL; it discovers the others) with redis-py's Retry.

Also the errors a caller waits out instead of failing on: a dropped connection, and the moments of a
master failover (cluster down, slots not yet covered, TRYAGAIN)."""

from __future__ import annotations

import os
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline as AsyncClusterPipeline
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterPipeline as SyncClusterPipeline
from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.retry import Retry

CLUSTER_ENV = "TOKENRELAY_REDIS_CLUSTER"
# Per command, the cluster client retries (re-reading the slot map) this many times with backoff:
# about 3 s in all, the order of a failover's cluster-node-timeout; callers that must outlast longer
# outages (the worker's loops, Client.stream) retry on top, on RETRYABLE_ERRORS.
CLUSTER_RETRIES = 8
CLUSTER_BACKOFF_BASE_S = 0.05
CLUSTER_BACKOFF_CAP_S = 1.0

# Errors that heal by waiting: connection loss, and a cluster between a master's death and its
# replica's promotion (cluster down, TRYAGAIN, slots not covered, no node reachable: the cluster
# client's RedisClusterException, which is not a RedisError).
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, ClusterError, TryAgainError, RedisClusterException)

SyncRedis = redis.Redis | RedisCluster
AsyncRedis = aioredis.Redis | AsyncRedisCluster


def cluster_from_env(environ: dict[str, str] | None = None) -> bool:
    """TOKENRELAY_REDIS_CLUSTER as a bool (true/1/yes/on)."""
    value = (os.environ if environ is None else environ).get(CLUSTER_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=CLUSTER_BACKOFF_CAP_S, base=CLUSTER_BACKOFF_BASE_S)


def connect(url: str, *, cluster: bool = False, **kwargs: Any) -> SyncRedis:
    """A synchronous client: redis.Redis, or RedisCluster from any node's URL (thread-safe both)."""
    if not cluster:
        return redis.Redis.from_url(url, **kwargs)
    kwargs.pop("health_check_interval", None)  # the cluster client checks nodes itself
    return RedisCluster.from_url(url, retry=Retry(_backoff(), CLUSTER_RETRIES), **kwargs)


def connect_async(url: str, *, cluster: bool = False, **kwargs: Any) -> AsyncRedis:
    """An asyncio client: redis.asyncio.Redis, or redis.asyncio.cluster.RedisCluster from any node's URL."""
    if not cluster:
        return aioredis.Redis.from_url(url, **kwargs)
    kwargs.pop("health_check_interval", None)
    return AsyncRedisCluster.from_url(url, retry=AsyncRetry(_backoff(), CLUSTER_RETRIES), **kwargs)


def is_cluster(client: object) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def is_cluster_pipeline(pipe: object) -> bool:
    return isinstance(pipe, (SyncClusterPipeline, AsyncClusterPipeline))
