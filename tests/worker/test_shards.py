"""Sharded queues on one Redis (TOKENRELAY_QUEUE_SHARDS=4): a job queued on another shard than its id's is
moved home and served there; per-shard queue metrics; the gateway's reader follows jobs on several shards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api_client.connection import connect_async
from api_client.gateway.relay import ResultReader
from api_client.keys import JOB_FIELD
from api_client.schema import DoneEvent, TokenEvent, Usage, dump_event
from tests.worker.conftest import (
    InProcessWorker,
    QueueTarget,
    assert_contiguous,
    num_pending,
    settings_for,
    wait_final,
    wait_until,
)

PARAMS = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize("queue_target", ["redis-4"], indirect=True)
def test_a_job_on_the_wrong_shard_is_moved_to_its_ids_shard_and_served(
        queue_target: QueueTarget, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    keys = queue_target.keys
    client: Any = queue_target.client()
    worker = start_worker(settings_for(queue_target.url, model_dir, **queue_target.settings))
    wrong = next(f"w{i}" for i in range(100) if keys.shard_of(f"w{i}") != 0)
    # A producer that knows nothing of shards: everything goes to shard 0's stream.
    client.xadd(keys.shards[0].jobs, {JOB_FIELD: json.dumps({"id": wrong, "prompt": "hi", "params": PARAMS})})
    entry_id = client.xadd(keys.shards[0].jobs, {JOB_FIELD: json.dumps({"prompt": "no id", "params": PARAMS})})
    anonymous = entry_id.decode()  # a job without an id is known by its entry id
    for job_id in (wrong, anonymous):
        evs = wait_final(client, job_id, keys=keys)  # found from the id alone, on the id's shard
        assert len(assert_contiguous(evs)) == PARAMS["max_tokens"] and evs[-1].type == "done"
    assert worker.worker.engine.stats().num_generated_tokens == 2 * PARAMS["max_tokens"]  # each served once
    wait_until(lambda: num_pending(client, keys) == 0, what="every entry acked")
    registry = worker.worker.metrics.registry
    # Refreshed every metrics_interval_s: every shard reports, and shard 0 (the moves came through it)
    # has nothing pending once all is acked.
    wait_until(lambda: [registry.get_sample_value("tokenrelay_queue_shard_lag", {"shard": str(s)})
                        for s in range(4)] == [0.0] * 4 and
               registry.get_sample_value("tokenrelay_queue_shard_pending", {"shard": "0"}) == 0.0,
               what="per-shard metrics")


@pytest.mark.parametrize("queue_target", ["redis-4"], indirect=True)
def test_the_gateway_reader_follows_jobs_on_several_shards(queue_target: QueueTarget) -> None:
    keys = queue_target.keys
    job_ids = [f"cmpl-x.{i}" for i in range(6)]
    assert len({keys.shard_of(j) for j in job_ids}) > 1
    client: Any = queue_target.client()

    def token(i: int) -> dict[str, str]:
        return {"event": dump_event(TokenEvent(index=0, token_ids=[i], text=str(i)))}

    def done(i: int) -> dict[str, str]:
        return {"event": dump_event(DoneEvent(finish_reason="length", text=str(i), token_ids=[i],
                                              usage=Usage(prompt_tokens=1, completion_tokens=1)))}

    async def read_all() -> list[tuple[int, str]]:
        redis = connect_async(queue_target.url)
        reader = ResultReader(redis, keys, job_ids)
        seen: list[tuple[int, str]] = []
        for i, job_id in enumerate(job_ids[:3]):
            client.xadd(keys.result(job_id), token(i))
        while not reader.is_done:
            got = await reader.read(200)
            seen.extend((index, event.type) for index, event in got)
            if len(seen) == 3:  # the rest arrives while the reader blocks on every shard at once
                for i, job_id in enumerate(job_ids):
                    if i >= 3:
                        client.xadd(keys.result(job_id), token(i))
                    client.xadd(keys.result(job_id), done(i))
        await redis.aclose()
        return seen

    seen = asyncio.run(asyncio.wait_for(read_all(), 30))
    for i in range(len(job_ids)):
        assert [t for index, t in seen if index == i] == ["token", "done"], seen


@pytest.mark.parametrize("queue_target", ["redis-4"], indirect=True)
def test_both_lanes_on_every_shard_are_served(
        queue_target: QueueTarget, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    from api_client.client import Client

    keys = queue_target.keys
    client: Any = queue_target.client()
    producer = Client(queue_target.url, **queue_target.client_kwargs)
    start_worker(settings_for(queue_target.url, model_dir, **queue_target.settings))
    jobs = {f"l{i}": ("batch" if i % 2 else "interactive") for i in range(8)}
    assert len({keys.shard_of(j) for j in jobs}) > 1
    for job_id, lane in jobs.items():
        producer.submit(prompt="hi", job_id=job_id, lane=lane, **PARAMS)
        assert client.xlen(keys.for_job(job_id).lane_jobs(lane)) >= 1  # on its id's shard, in its lane
    for job_id, lane in jobs.items():
        evs = wait_final(client, job_id, keys=keys)
        assert len(assert_contiguous(evs)) == PARAMS["max_tokens"] and evs[-1].type == "done", (lane, evs)
        assert producer.status(job_id).state == "done"
    wait_until(lambda: num_pending(client, keys) == 0, what="every entry acked in every (lane, shard) stream")
