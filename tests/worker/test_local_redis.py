"""ensure_local_redis: the no-settings default of `python -m worker` (start a local redis-server or explain)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
import redis

from tests.helpers.redis_server import RedisServer
from worker.local_redis import LocalRedis, RedisUnavailableError, ensure_local_redis


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


@pytest.fixture
def started() -> Iterator[list[LocalRedis]]:
    """Servers a test started, stopped even when it fails."""
    procs: list[LocalRedis] = []
    yield procs
    for proc in procs:
        proc.stop()


def test_configured_url_is_left_alone(started: list[LocalRedis]) -> None:
    free_url = f"redis://127.0.0.1:{_free_port()}/0"
    # Even with nothing on the default address, a configured URL means "use that one".
    assert ensure_local_redis("redis://redis.example:6379/0", default_url=free_url) is None
    assert not _pings(free_url)


def test_starts_a_server_on_the_default_port_when_nothing_answers(
        started: list[LocalRedis], caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    with caplog.at_level(logging.WARNING, logger="tokenrelay.worker"):
        proc = ensure_local_redis(None, default_url=url)
    assert proc is not None
    started.append(proc)
    assert proc.url == url and _pings(url)
    assert any("started a local redis-server" in r.getMessage() and url in r.getMessage() for r in caplog.records)
    # A second worker on the same machine finds it answering and starts nothing.
    assert ensure_local_redis(None, default_url=url) is None
    proc.stop()
    assert proc.poll() is not None and not _pings(url)


def test_uses_a_redis_that_already_answers(started: list[LocalRedis]) -> None:
    with RedisServer() as server:
        assert ensure_local_redis(None, default_url=server.url) is None


def test_takes_a_free_port_when_the_default_one_is_not_redis(started: list[LocalRedis]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        proc = ensure_local_redis(None, default_url=f"redis://127.0.0.1:{port}/0")
        assert proc is not None
        started.append(proc)
        assert not proc.url.endswith(f":{port}/0")
        assert _pings(proc.url)


def test_no_redis_server_installed_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    with pytest.raises(RedisUnavailableError) as info:
        ensure_local_redis(None, default_url=f"redis://127.0.0.1:{_free_port()}/0")
    message = str(info.value)
    assert "TOKENRELAY_REDIS_URL" in message and "apt-get install redis-server" in message


def test_default_url_must_be_a_redis_url() -> None:
    with pytest.raises(ValueError, match="redis://host:port"):
        ensure_local_redis(None, default_url="http://127.0.0.1:6379")
