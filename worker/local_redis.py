"""The zero-configuration default: with no Redis URL configured and none answering on localhost, start a
local `redis-server` child for `python -m worker` (and say so), or explain how to get one."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger("tokenrelay.worker")

DEFAULT_LOCAL_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 0.5


class RedisUnavailableError(RuntimeError):
    """No Redis is configured, none answers on localhost, and no redis-server is installed."""


class LocalRedis(subprocess.Popen[bytes]):
    """A redis-server child started by ensure_local_redis; `url` is where it listens."""

    url: str
    dir: Path

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; its data dir goes too (the next start makes a new one)."""
        if self.poll() is None:
            self.terminate()
            try:
                self.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def ensure_local_redis(url: str | None, *, default_url: str = DEFAULT_LOCAL_URL,
                       binary: str | None = None) -> LocalRedis | None:
    """None when `url` is configured (it is used as is) or something answers PING at `default_url`.
    Otherwise start `redis-server` on default_url's port (or a free one if that port is taken by
    something that is not Redis) and return the process; its `.url` is the URL to use and the caller
    `.stop()`s it at exit. Raises RedisUnavailableError, with what to do, when none is installed."""
    if url:
        return None
    host, port = _host_port(default_url)
    if _answers_ping(host, port):
        logger.info("no TOKENRELAY_REDIS_URL set: using the Redis answering on %s:%d", host, port)
        return None
    binary = binary or shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailableError(
            f"no Redis configured and none answers on {host}:{port}: set TOKENRELAY_REDIS_URL=redis://host:port/0, "
            "or install redis-server (Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`) "
            "and `python -m worker` starts a local one, or run `docker compose up redis`")
    if _is_bound(host, port):  # something that is not Redis holds the port: take any free one
        port = _free_port(host)
    data_dir = Path(tempfile.mkdtemp(prefix="tokenrelay-redis-"))
    args = [binary, "--port", str(port), "--bind", host, "--dir", str(data_dir), "--save", "",
            "--appendonly", "no", "--logfile", "redis.log", "--daemonize", "no"]
    # Its own session: a Ctrl-C in the terminal must reach only the worker, which still needs Redis
    # while it drains and hands jobs back; the worker stops this server last.
    proc = LocalRedis(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    proc.url = f"redis://{host}:{port}/0"
    proc.dir = data_dir
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers_ping(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            log = data_dir / "redis.log"
            tail = log.read_text(errors="replace")[-1000:] if log.exists() else "(no log)"
            proc.stop()
            raise RedisUnavailableError(f"started {binary} on {host}:{port} but it did not answer PING: {tail}")
        time.sleep(0.05)
    logger.warning("no TOKENRELAY_REDIS_URL set and no Redis on %s:%d: started a local redis-server at %s "
                   "(pid %d, in memory, dir %s); it stops with the worker. Set TOKENRELAY_REDIS_URL to use your own.",
                   host, _host_port(default_url)[1], proc.url, proc.pid, data_dir)
    return proc


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"default_url must be redis://host:port/db, got {url!r}")
    return parts.hostname, parts.port or 6379


def _answers_ping(host: str, port: int) -> bool:
    # A raw inline PING: no client library needed, and no wait on a port that is closed.
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # "+PONG", or "-NOAUTH ..." from a Redis that wants a password: Redis either way.
    return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")


def _is_bound(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
