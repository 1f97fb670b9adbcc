"""`python -m worker`: run the worker (or `--check` its health) with settings from TOKENRELAY_* variables.

Exit codes: 0 clean stop (SIGTERM/SIGINT, burst done, healthy check), 1 failure (or an unhealthy check),
2 bad configuration: found before the model loads where it can be (worker/preflight.py)."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import sys
import uuid

from pydantic import ValidationError

from worker.settings import ENV_PREFIX, WorkerSettings, settings_help, unknown_env_names

logger = logging.getLogger("tokenrelay.worker")
EARLY_CLAIM_CONNECT_TIMEOUT_S = 2.0  # the name check before the model loads is skipped past this


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m worker",
        description="Drain {p}:jobs into the engine and stream tokens to {p}:result:{id} (wire protocol v1).",
        epilog="settings (environment variables):\n" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if this worker's heartbeat ({p}:worker:{consumer}) is alive and its engine "
                             "steps, 1 otherwise (a container healthcheck)")
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
    for name, close in unknown_env_names(os.environ):
        logger.warning("unknown setting %s is ignored%s", name, f" (did you mean {close}?)" if close else
                       "; `python -m worker --help` lists every setting")
    if args.check:
        from worker import health

        ok, message = health.check(settings.redis_url, settings.keys, settings.consumer, settings.health_stall_s,
                                   settings.socket_timeout_s)
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    # From here on a stop signal is a clean exit (0), whatever the worker is waiting for.
    signal.signal(signal.SIGTERM, _exit_before_serving)
    signal.signal(signal.SIGINT, _exit_before_serving)
    from worker import preflight

    found = preflight.problems(settings)  # before the model loads: a bad device, a taken metrics port
    for problem in found:
        print(problem, file=sys.stderr)
    if found:
        return 2
    from worker.local_redis import RedisUnavailableError, ensure_local_redis

    try:  # no TOKENRELAY_REDIS_URL: use the Redis on localhost, or start one for this worker
        local_redis = ensure_local_redis(os.environ.get(f"{ENV_PREFIX}REDIS_URL"))
    except RedisUnavailableError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if local_redis is not None:
        settings = settings.model_copy(update={"redis_url": local_redis.url})
    incarnation = uuid.uuid4().hex
    try:
        if not _claim_consumer_name_early(settings, incarnation):
            return 2
        return _run(settings, burst=args.burst, incarnation=incarnation)
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


def _claim_consumer_name_early(settings: WorkerSettings, incarnation: str) -> bool:
    """Take the consumer name before the model loads, so that a second worker under a live one's name
    fails in seconds (False: it printed why). Skipped when Redis does not answer yet: the startup
    claims the name anyway, once Redis answers (worker/health.py)."""
    from redis.exceptions import RedisClusterException, RedisError

    from api_client.connection import connect_async
    from worker import health

    async def claim() -> None:
        client = connect_async(settings.redis_url, cluster=settings.redis_cluster,
                               socket_timeout=settings.socket_timeout_s,
                               socket_connect_timeout=min(EARLY_CLAIM_CONNECT_TIMEOUT_S, settings.socket_timeout_s))
        try:
            await health.claim(client, settings.keys, settings.consumer, incarnation, settings.heartbeat_ttl_s,
                               health.heartbeat_value(settings.consumer, incarnation, 0, None,
                                                      model=settings.served_model))
        finally:
            await client.aclose()

    try:
        asyncio.run(claim())
    except health.ConsumerNameInUseError as exc:
        print(str(exc), file=sys.stderr)
        return False
    except (RedisError, RedisClusterException, OSError) as exc:  # unreachable, or refused credentials: the startup says which
        logger.info("consumer name check before loading skipped (%s); the startup makes it", exc)
    return True


def _run(settings: WorkerSettings, *, burst: bool, incarnation: str | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_before_serving)
    signal.signal(signal.SIGINT, _exit_before_serving)
    from worker.app import Worker

    try:
        worker = Worker(settings, burst=burst, incarnation=incarnation)
    except ValueError as exc:  # a bad engine knob or an unreadable checkpoint
        print(f"cannot start the engine: {exc}", file=sys.stderr)
        return 2
    if _signalled_before_serving:  # the stop's SystemExit was swallowed while the model loaded
        worker.engine.shutdown()
        return 0
    from redis.exceptions import AuthenticationError, AuthorizationError

    from worker.health import ConsumerNameInUseError
    from worker.metrics import MetricsPortError

    try:
        return asyncio.run(worker.run())
    except (AuthenticationError, AuthorizationError) as exc:
        print(f"Redis refused this worker's credentials ({exc}): check the user and password in "
              f"{ENV_PREFIX}REDIS_URL (redis://user:password@host:port/db)", file=sys.stderr)
        return 2
    except (ConsumerNameInUseError, MetricsPortError) as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
