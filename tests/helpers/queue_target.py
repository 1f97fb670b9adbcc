"""Where a test's queue lives: a plain redis-server, or a local Redis Cluster (tests/helpers/redis_cluster.py),
with a shard count. Tests that must hold on every layout take the `queue_target` fixture, parametrized
indirectly with TARGETS (or a subset), instead of `redis_server`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from api_client.keys import Keys
from tests.helpers.redis_cluster import LocalCluster
from tests.helpers.redis_server import RedisServer

PREFIX = "trtest"


@dataclass
class QueueTarget:
    name: str
    keys: Keys
    server: RedisServer | None = None  # the plain Redis (or, beside a cluster, Celery's broker)
    cluster: LocalCluster | None = None
    _broker: RedisServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        assert self.server is not None
        return self.server.url

    @property
    def broker_url(self) -> str:
        """A plain Redis for Celery (kombu's Redis transport does not speak Redis Cluster)."""
        if self.cluster is None:
            return self.url
        if self._broker is None:
            self._broker = RedisServer()
        return self._broker.url

    @property
    def settings(self) -> dict[str, Any]:
        """Worker / gateway settings (lower-case names) that select this layout."""
        return {"redis_cluster": self.keys.cluster, "queue_shards": self.keys.num_shards}

    @property
    def client_kwargs(self) -> dict[str, Any]:
        """Client / AsyncClient keyword arguments for this layout."""
        return {"prefix": self.keys.prefix, "cluster": self.keys.cluster, "num_shards": self.keys.num_shards}

    def client(self, **kwargs: Any) -> Any:
        """A synchronous redis-py client (RedisCluster for a cluster) for the test's own reads."""
        if self.cluster is not None:
            return self.cluster.client(**kwargs)
        assert self.server is not None
        return self.server.client(**kwargs)

    def close(self) -> None:
        for closer in (self.cluster, self.server, self._broker):
            if closer is not None:
                closer.close()


def make_target(name: str) -> QueueTarget:
    """"redis" (today's layout), "redis-4" (4 shards on one Redis), "cluster-1", "cluster-4"."""
    kind, _, shards = name.partition("-")
    num_shards = int(shards or 1)
    if kind == "redis":
        return QueueTarget(name, Keys(PREFIX, num_shards=num_shards), server=RedisServer(appendonly=True))
    if kind == "cluster":
        return QueueTarget(name, Keys(PREFIX, num_shards=num_shards, cluster=True), cluster=LocalCluster())
    raise ValueError(f"unknown queue target {name!r}")


# Every layout: the cluster ones start 6 servers and are marked slow (reliability).
TARGETS = ["redis", pytest.param("cluster-1", marks=pytest.mark.reliability),
           pytest.param("cluster-4", marks=pytest.mark.reliability)]


@pytest.fixture
def queue_target(request: pytest.FixtureRequest) -> Iterator[QueueTarget]:
    target = make_target(getattr(request, "param", "redis"))
    try:
        yield target
    finally:
        target.close()
