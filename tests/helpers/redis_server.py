"""Real redis-server processes for tests: start on a free port, kill, restart with the same data dir.

`redis_server` is a pytest fixture (a fresh server per test); import it from a conftest to use it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not on PATH; the tests need a real Redis: "
                           "install it with `apt-get install -y redis-server` (the CI script does)")
    return path


class RedisServer:
    """One redis-server child process bound to 127.0.0.1, with RDB snapshots off and its own dir.
    With appendonly=True every write is fsynced to the AOF, so kill() + restart() loses nothing."""

    def __init__(self, port: int | None = None, appendonly: bool = False, dir: str | Path | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self._binary = redis_server_binary()
        self._owns_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="tokenrelay-redis-")) if dir is None else Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self._fixed_port = port is not None
        self.port = port if port is not None else _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 10.0)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> None:
        assert not self.is_running, "server already running"
        for attempt in range(3):
            try:
                self._start_once()
                return
            except RuntimeError:
                # Another process may have taken the free port between probe and bind: pick a new one.
                if self._fixed_port or attempt == 2:
                    raise
                self.port = _free_port()

    def _start_once(self) -> None:
        args = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--logfile", "redis.log", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self._log_tail()}")
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.02)
        finally:
            probe.close()
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S} s: {self._log_tail()}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM: the AOF is flushed)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        """Start again on the same port and dir (AOF data survives when appendonly=True)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove the dir it made."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test (tests may kill and restart it)."""
    with RedisServer(appendonly=True) as server:
        yield server


def read_stream(client: redis.Redis, key: str) -> list[tuple[str, dict[str, bytes]]]:
    """XRANGE key - +: entry ids and field names decoded, values left as bytes (for test assertions)."""
    entries: Any = client.xrange(key)
    return [(entry_id.decode(), {name.decode(): value for name, value in fields.items()})
            for entry_id, fields in entries]
