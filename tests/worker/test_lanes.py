"""Priority lanes on a real redis-server and a real worker (tiny model): priority orders the queue within
a lane, interactive work runs before batch work and preempts it, deadlines in the batch lane, and the
per-lane queue numbers the metrics export."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from api_client import Client
from api_client.keys import EVENT_FIELD, JOB_FIELD
from api_client.schema import parse_event
from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import (
    KEYS,
    PREFIX,
    InProcessWorker,
    assert_contiguous,
    settings_for,
    wait_final,
    wait_until,
)
from worker.metrics import queue_state


def _done_entry_id(client: Any, job_id: str) -> tuple[int, int]:
    """Where the job's final event sits in time: its entry id (ms, seq)."""
    entry_id, fields = client.xrevrange(KEYS.result(job_id), count=1)[0]
    assert parse_event(fields[EVENT_FIELD.encode()]).is_final
    ms, seq = entry_id.decode().split("-")
    return int(ms), int(seq)


def _num_pending(client: Any, lane: str) -> int:
    return int(client.xpending(KEYS.lane_jobs(lane), KEYS.group)["pending"])


def test_priority_orders_the_queue_and_interactive_runs_before_batch(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    worker = start_worker(settings_for(redis_server.url, model_dir, max_num_seqs=1, scheduling_policy="priority",
                                       queue_lookahead=8))
    client = Client(redis_server.url, prefix=PREFIX)
    raw = client.redis
    # The one seat is taken while the rest is queued, so that all of it is in the worker when the seat frees.
    client.submit("blocker", job_id="blocker", max_tokens=200, ignore_eos=True)
    wait_until(lambda: raw.xlen(KEYS.result("blocker")) > 0, what="the blocker's first token")
    for job_id, priority in (("batch-a", -9), ("batch-b", 0)):
        client.submit(f"batch job {job_id}", job_id=job_id, priority=priority, lane="batch", max_tokens=3)
    for priority in (5, 0, -5):  # the order the user sent them in
        client.submit(f"question with priority {priority}", job_id=f"p{priority}", priority=priority, max_tokens=3)
    wait_until(lambda: _num_pending(raw, "interactive") == 4 and _num_pending(raw, "batch") == 2,
               what="every job delivered to the worker")
    client.cancel("blocker")
    order = ["p-5", "p0", "p5", "batch-a", "batch-b"]
    for job_id in order:
        assert wait_final(raw, job_id)[-1].type == "done", job_id
    assert sorted(order, key=lambda j: _done_entry_id(raw, j)) == order
    assert client.status("batch-b").state == "done" and client.status("p5").state == "done"
    assert _num_pending(raw, "interactive") == 0 and _num_pending(raw, "batch") == 0
    assert worker.worker.table.__len__() == 0
    client.close()


def test_interactive_job_preempts_a_running_batch_job_which_still_finishes_whole(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker],
        reference: Callable[[str, dict[str, Any]], tuple[list[int], str]]) -> None:
    worker = start_worker(settings_for(redis_server.url, model_dir, max_num_seqs=1))
    client = Client(redis_server.url, prefix=PREFIX)
    raw = client.redis
    batch_params = {"max_tokens": 150, "temperature": 0.0, "ignore_eos": True}
    chat_params = {"max_tokens": 4, "temperature": 0.0}
    client.submit("a long batch job", job_id="long", lane="batch", **batch_params)
    wait_until(lambda: raw.xlen(KEYS.result("long")) >= 2, what="the batch job's first tokens")
    client.submit("a chat question", job_id="chat", **chat_params)
    chat = wait_final(raw, "chat")
    long = wait_final(raw, "long", timeout_s=120)
    assert _done_entry_id(raw, "chat") < _done_entry_id(raw, "long")  # it did not wait for the batch job
    assert worker.worker.engine.stats().num_preemptions >= 1
    # Preempted and recomputed: the batch job's stream is contiguous and its tokens are the greedy ones.
    assert assert_contiguous(long) == reference("a long batch job", batch_params)[0] == long[-1].token_ids
    assert assert_contiguous(chat) == reference("a chat question", chat_params)[0]
    client.close()


def test_an_expired_batch_job_is_answered_without_a_slot(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    worker = start_worker(settings_for(redis_server.url, model_dir, max_num_seqs=1))
    client = Client(redis_server.url, prefix=PREFIX)
    client.submit("too late", job_id="late", lane="batch", deadline_ms=int(time.time() * 1000) - 1, max_tokens=4)
    client.submit("in time", job_id="on-time", lane="batch", max_tokens=4)
    assert [(e.type, e.code) for e in wait_final(client.redis, "late")] == [("error", "expired")]
    assert wait_final(client.redis, "on-time")[-1].type == "done"
    wait_until(lambda: worker.worker.engine.stats().num_generated_tokens == 4, what="engine stats")
    assert _num_pending(client.redis, "batch") == 0  # acknowledged
    client.close()


def test_queue_state_of_a_lane(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        stream = KEYS.lane_jobs("batch")
        assert stream == f"{PREFIX}:jobs:batch"
        assert await queue_state(redis, stream, KEYS.group) is None  # no stream, no group yet
        await redis.xgroup_create(stream, KEYS.group, id="0", mkstream=True)
        ids = [await redis.xadd(stream, {JOB_FIELD: "{}"}) for _ in range(3)]
        await redis.xreadgroup(KEYS.group, "w", {stream: ">"}, count=1)
        state = await queue_state(redis, stream, KEYS.group)
        assert state is not None and (state.lag, state.pending) == (2, 1)
        assert state.oldest_ms == int(ids[0].decode().split("-")[0])
        await redis.xack(stream, KEYS.group, ids[0])
        state = await queue_state(redis, stream, KEYS.group)
        assert state is not None and (state.lag, state.pending) == (2, 0)
        assert state.oldest_ms == int(ids[1].decode().split("-")[0])  # the oldest one not delivered
        await redis.aclose()

    asyncio.run(scenario())


def test_a_batch_job_handed_back_at_shutdown_goes_back_to_its_lane_and_resumes(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker],
        reference: Callable[[str, dict[str, Any]], tuple[list[int], str]]) -> None:
    params = {"max_tokens": 120, "temperature": 0.0, "ignore_eos": True}
    first = start_worker(settings_for(redis_server.url, model_dir, drain_timeout_s=0, lease_s=1))
    client = Client(redis_server.url, prefix=PREFIX)
    raw = client.redis
    client.submit("handed back", job_id="hb", lane="batch", **params)
    wait_until(lambda: raw.xlen(KEYS.result("hb")) >= 2, what="the batch job's first tokens")
    first.stop()
    requeued = [fields for _, fields in raw.xrange(KEYS.lane_jobs("batch"))]
    assert any(f.get(b"job_id") == b"hb" for f in requeued)  # at the tail of the batch lane
    assert raw.xlen(KEYS.jobs) == 0 and client.status("hb").state in ("queued", "running")
    start_worker(settings_for(redis_server.url, model_dir, consumer="w2"))
    evs = wait_final(raw, "hb", timeout_s=120)
    assert assert_contiguous(evs) == reference("handed back", params)[0]
    client.close()
