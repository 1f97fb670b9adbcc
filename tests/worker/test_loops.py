"""The worker's background loops: they end when cancelled, even when the cancel reaches them disguised
as a timeout, and a Redis outage does not flood the log.

asyncio.timeout() (used by redis-py for every socket wait) turns a cancel that lands as its deadline
expires into TimeoutError; a retry loop catching TimeoutError/OSError would then run forever and the
worker would never exit on SIGTERM. These tests hand the loops exactly that disguised cancel."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.aio import cancel_requested
from worker.app import Worker

needs_cancelling = pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is Python 3.11+")


class DisguisedCancel:
    """A body that turns the first cancel it receives into redis' TimeoutError, then behaves."""

    def __init__(self) -> None:
        self.calls = 0
        self.disguised = 0

    async def __call__(self) -> None:
        self.calls += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError as exc:
            if self.disguised:
                raise
            self.disguised += 1
            raise RedisTimeoutError("Timeout reading from redis") from exc


@needs_cancelling
def test_cancel_requested_sees_a_swallowed_cancel() -> None:
    async def main() -> tuple[bool, bool]:
        seen: list[bool] = []

        async def victim() -> None:
            seen.append(cancel_requested())
            with contextlib.suppress(asyncio.CancelledError):  # swallowed, as a timeout context would
                await asyncio.sleep(10)
            seen.append(cancel_requested())

        task = asyncio.create_task(victim())
        await asyncio.sleep(0)
        task.cancel()
        await task
        return seen[0], seen[1]

    before, after = asyncio.run(main())
    assert (before, after) == (False, True)


@needs_cancelling
def test_every_loop_ends_on_a_cancel_disguised_as_timeout() -> None:
    async def main() -> tuple[bool, int]:
        body = DisguisedCancel()
        task = asyncio.create_task(Worker._every(0.01, body))
        await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1.0)
        ended = task in done
        if not ended:  # without the fix the loop goes on: stop it for real so the test can report
            task.cancel()
            await asyncio.wait([task], timeout=1.0)
        return ended, body.disguised

    ended, disguised = asyncio.run(main())
    assert disguised == 1
    assert ended, "the loop retried a cancel that arrived as a TimeoutError"


def test_a_redis_outage_logs_once_per_interval_not_once_per_attempt(caplog: pytest.LogCaptureFixture) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    state = {"down": True, "calls": 0}

    async def check_cancel() -> None:
        state["calls"] += 1
        if state["down"]:
            raise RedisConnectionError("Error 111 connecting to redis:6379. Connection refused.")

    async def main() -> None:
        task = asyncio.create_task(Worker._every(0.001, check_cancel))
        await asyncio.sleep(0.3)
        state["down"] = False
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait([task], timeout=1.0)

    with caplog.at_level("INFO", logger="tokenrelay.worker"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    recovered = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert state["calls"] > 20  # it kept trying all along
    assert len(warnings) == 1 and "Connection refused" in warnings[0].getMessage()
    assert len(recovered) == 1


def test_output_handoff_moves_bursts_in_order_with_few_wakeups() -> None:
    import threading

    from engine.outputs import RequestOutput
    from worker.intake import OutputHandoff

    class Counting(OutputHandoff):
        moves = 0

        def _move(self) -> None:
            Counting.moves += 1
            super()._move()

    async def main() -> list[int]:
        got: list[int] = []
        handoff = Counting(asyncio.get_running_loop(), lambda out: got.append(out.index))

        def engine_thread() -> None:
            for step in range(50):
                for i in range(100):  # one step's outputs, handed over back to back
                    handoff(RequestOutput(request_id=f"r{i}", token_ids=[1], text="", index=step * 100 + i))

        thread = threading.Thread(target=engine_thread)
        thread.start()
        while thread.is_alive() or len(got) < 5000:
            await asyncio.sleep(0.001)
        thread.join()
        return got

    got = asyncio.run(main())
    assert got == list(range(5000))  # every output, in the order the engine produced them
    assert Counting.moves < 5000 // 4  # bursts moved together, not one wake-up per output
