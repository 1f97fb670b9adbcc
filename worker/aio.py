"""asyncio helpers shared by the worker's loops."""

from __future__ import annotations

import asyncio


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
