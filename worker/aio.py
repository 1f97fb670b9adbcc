"""asyncio helpers shared by the worker's loops: cancel detection and the Redis retry policy."""

from __future__ import annotations

import asyncio

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

MAX_BACKOFF_S = 2.0


def retry_forever(first_backoff_s: float, errors: tuple[type[BaseException], ...]) -> Retry:
    """redis-py's Retry for a loop that must outlast a Redis outage: it waits first_backoff_s after the
    first failure, doubling up to MAX_BACKOFF_S, and never gives up (the `fail` callback it is given
    raises to stop it: on cancellation, on shutdown, on errors that waiting cannot heal)."""
    return Retry(ExponentialBackoff(cap=MAX_BACKOFF_S, base=first_backoff_s / 2), retries=-1,
                 supported_errors=errors)  # type: ignore[arg-type]


def cancel_requested() -> bool:
    """True when the current task has a cancellation pending.

    A retry loop that catches TimeoutError / OSError must check this: when a cancel lands while a
    redis-py timeout is expiring, asyncio.timeout() reports the cancel as a TimeoutError, and a loop
    that retries it would never end (a worker that ignores SIGTERM, an asyncio.run() that never returns).
    Task.cancelling() counts cancels not yet consumed; it exists from Python 3.11, before which the
    race cannot be detected and the loops rely on their stop flags."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling is not None and cancelling() > 0)
