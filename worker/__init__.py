"""The long-lived worker process: Redis stream intake, the engine, the result publisher, recovery.

`python -m worker --help` lists every setting; `Worker(settings).run()` is the same thing in code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.app import Worker

__all__ = ["Worker", "WorkerSettings"]


def __getattr__(name: str) -> object:
    # Worker pulls in the engine (torch): load it only when asked for, so `--check` stays light.
    if name == "Worker":
        from worker.app import Worker

        return Worker
    raise AttributeError(name)
