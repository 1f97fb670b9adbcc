"""`python -m worker`: run the worker (or `--check` its health) with settings from TOKENRELAY_* variables.

Exit codes: 0 clean stop (SIGTERM/SIGINT, burst done, healthy check), 1 failure, 2 bad configuration."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys

from pydantic import ValidationError

from worker.settings import ENV_PREFIX, WorkerSettings, settings_help


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m worker",
        description="Drain {p}:jobs into the engine and stream tokens to {p}:result:{id} (wire protocol v1).",
        epilog="settings (environment variables):\n" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if a live worker heartbeat exists under the prefix, 1 otherwise")
    parser.add_argument("--burst", action="store_true",
                        help="exit once the queue is empty and nothing runs (tests, batch jobs)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # `kill -USR2 <pid>` prints every thread's stack to stderr: how to see where a stuck worker waits.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        print(f"invalid {ENV_PREFIX}* setting:\n{exc}", file=sys.stderr)
        return 2
    if args.check:
        from worker import health

        ok, message = health.check(settings.redis_url, settings.keys, settings.socket_timeout_s)
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    from worker.local_redis import RedisUnavailableError, ensure_local_redis

    try:  # no TOKENRELAY_REDIS_URL: use the Redis on localhost, or start one for this worker
        local_redis = ensure_local_redis(os.environ.get(f"{ENV_PREFIX}REDIS_URL"))
    except RedisUnavailableError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if local_redis is not None:
        settings = settings.model_copy(update={"redis_url": local_redis.url})
    try:
        return _run(settings, burst=args.burst)
    finally:
        if local_redis is not None:  # last: the worker needed it to drain and hand jobs back
            local_redis.stop()


_signalled_before_serving = False


def _exit_before_serving(signum: int, frame: object) -> None:
    # SIGTERM/SIGINT while the model loads: nothing was read from Redis yet, so a clean exit is all a
    # stop needs. Worker.run() installs the draining handlers once it serves. The flag is for when the
    # SystemExit never reaches us: library code that guards an optional import with a bare `except:`
    # swallows it if the signal lands there.
    global _signalled_before_serving
    _signalled_before_serving = True
    raise SystemExit(0)


def _run(settings: WorkerSettings, *, burst: bool) -> int:
    signal.signal(signal.SIGTERM, _exit_before_serving)
    signal.signal(signal.SIGINT, _exit_before_serving)
    from worker.app import Worker

    try:
        worker = Worker(settings, burst=burst)
    except ValueError as exc:  # a bad engine knob or an unreadable checkpoint
        print(f"cannot start the engine: {exc}", file=sys.stderr)
        return 2
    if _signalled_before_serving:  # the stop's SystemExit was swallowed while the model loaded
        worker.engine.shutdown()
        return 0
    from redis.exceptions import AuthenticationError, AuthorizationError

    try:
        return asyncio.run(worker.run())
    except (AuthenticationError, AuthorizationError) as exc:
        print(f"Redis refused this worker's credentials ({exc}): check the user and password in "
              f"{ENV_PREFIX}REDIS_URL (redis://user:password@host:port/db)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
