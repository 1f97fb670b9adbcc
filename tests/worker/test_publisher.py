"""Publisher: how it reacts to the token script's verdicts (without Redis: the replies are given)."""

from __future__ import annotations

from typing import Any

import pytest

from api_client.keys import Keys
from api_client.schema import Job
from worker import lua
from worker.jobs import Entry, JobTable, RunningJob
from worker.metrics import Metrics
from worker.publisher import Publisher, _Delta, _Op


class _AbortLog:
    """Records the engine aborts the publisher asks for (the only engine call _handle makes)."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _publisher_and_job() -> tuple[Publisher, RunningJob, _AbortLog]:
    engine = _AbortLog()
    publisher = Publisher(redis=None, keys=Keys("t"), scripts=None, table=JobTable(engine.abort),  # type: ignore[arg-type]
                          engine=engine, metrics=Metrics(), default_ttl_s=60)  # type: ignore[arg-type]
    job = RunningJob(job_id="dup", entry=Entry("1-0", {}), job=Job(id="dup", prompt="hi"), ttl_s=60)
    return publisher, job, engine


@pytest.mark.parametrize(("code", "reason"), [
    (lua.FINAL_EXISTS, "lost"),
    (lua.NOT_OWNER, "lost"),
    # Another entry of the same job id (a producer sent it twice) is further ahead: it owns the stream.
    (lua.OVERLAP, "lost"),
    # Our own bookkeeping skipped tokens: an internal error, not someone else's progress.
    (lua.GAP, "internal"),
])
def test_token_write_verdicts(code: int, reason: str) -> None:
    publisher, job, engine = _publisher_and_job()
    op: Any = _Op("tokens", job, delta=_Delta(index=2, token_ids=[5]))
    assert publisher._handle(op, [code, 3]) is None
    assert job.abort_reason == reason
    assert engine.aborted == ["dup"]


@pytest.mark.parametrize("finished", [True, False])
def test_a_batch_that_fails_to_publish_leaves_no_ghost_job(finished: bool) -> None:
    """A send that fails in a way the retry loop does not cover (a bug, an unexpected reply) after the
    batch advanced the job's tokens: the job is released for a takeover (it leaves the table and the
    engine, its entry stays pending, so after lease_s a worker resumes it from its result stream), never
    left holding a slot that no lease renews and no final event frees."""
    import asyncio

    from engine.outputs import RequestOutput

    publisher, job, engine = _publisher_and_job()
    publisher.table.add(job)

    async def failing_send(ops: list[_Op]) -> None:
        raise RuntimeError("injected: the pipeline answered something unexpected")

    publisher._send = failing_send  # type: ignore[method-assign]

    async def main() -> None:
        publisher.queue.put_nowait(RequestOutput("dup", [5, 6], "ab", finish_reason="length" if finished else None))
        publisher.queue.put_nowait(None)
        await publisher.run()

    asyncio.run(main())
    assert "dup" not in publisher.table
    assert engine.aborted == ([] if finished else ["dup"])
