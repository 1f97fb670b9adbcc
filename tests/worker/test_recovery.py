"""Recovery with hand-made pending entries: a dead consumer's job is taken over and resumed after the
tokens it published; final-already jobs are only acked; too many deliveries end in {p}:dead; a worker
whose lease was taken over stops writing; a restarted consumer claims its own pending jobs at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api_client.schema import DoneEvent, TokenEvent, Usage, dump_event
from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import (
    KEYS,
    InProcessWorker,
    assert_contiguous,
    dead_entries,
    events,
    settings_for,
    submit,
    wait_final,
    wait_until,
)

PARAMS = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


def deliver_to(client: Any, consumer: str, job_id: str, prompt: str, **extra: Any) -> str:
    submit(client, job_id, prompt=prompt, params=PARAMS, **extra)
    reply = client.xreadgroup(KEYS.group, consumer, {KEYS.jobs: ">"}, count=1)
    return reply[0][1][0][0].decode()


def publish_tokens(client: Any, job_id: str, tokenizer_text: list[str], token_ids: list[int]) -> None:
    """What a worker that died after k tokens left behind (one token per event)."""
    for i, (token_id, text) in enumerate(zip(token_ids, tokenizer_text, strict=True)):
        client.xadd(KEYS.result(job_id), {"event": dump_event(TokenEvent(index=i, token_ids=[token_id], text=text))})


def test_a_dead_consumers_job_resumes_after_its_published_tokens(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker],
        reference: Callable[[str, dict[str, Any]], tuple[list[int], str]]) -> None:
    client: Any = redis_server.client()
    client.xgroup_create(KEYS.jobs, KEYS.group, id="0", mkstream=True)
    token_ids, _ = reference("hello world", PARAMS)
    deliver_to(client, "dead-1", "resumed", "hello world")
    # Texts per token are not needed to be right for the resume; the done text is their concatenation.
    publish_tokens(client, "resumed", ["a", "b", "c", "d"], token_ids[:4])
    deliver_to(client, "dead-1", "finished", "hello")
    client.xadd(KEYS.result("finished"), {"event": dump_event(DoneEvent(
        finish_reason="stop", text="x", token_ids=[7], usage=Usage(prompt_tokens=1, completion_tokens=1)))})
    entry = deliver_to(client, "dead-1", "poison", "hello")
    client.xclaim(KEYS.jobs, KEYS.group, "dead-1", 0, [entry], retrycount=5)  # crashed 5 workers already
    wait_until(lambda: all(p["time_since_delivered"] > 300 for p in client.xpending_range(
        KEYS.jobs, KEYS.group, "-", "+", 10)), what="the dead consumer's entries to idle past the lease")

    worker = start_worker(settings_for(redis_server.url, model_dir, lease_s=0.25, max_deliveries=3))
    evs = wait_final(client, "resumed")
    tokens = assert_contiguous(evs)
    assert tokens == token_ids  # the continuation is the one the dead worker would have produced
    assert evs[-1].type == "done" and evs[-1].token_ids == token_ids
    assert evs[-1].text == "abcd" + "".join(e.text for e in evs[4:-1])
    assert evs[4].index == 4  # the new worker's first delta continues the index
    poison = wait_final(client, "poison")
    assert [(e.type, e.code) for e in poison] == [("error", "internal")]
    assert [d["job_id"] for d in dead_entries(client)] == [b"poison"]
    wait_until(lambda: client.xpending(KEYS.jobs, KEYS.group)["pending"] == 0, what="all acked")
    assert [e.type for e in events(client, "finished")] == ["done"]  # acked, nothing written again
    assert worker.worker.engine.stats().num_generated_tokens == len(token_ids) - 4


def test_a_restarted_consumer_claims_its_own_pending_jobs_at_once(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker],
        reference: Callable[[str, dict[str, Any]], tuple[list[int], str]]) -> None:
    client: Any = redis_server.client()
    client.xgroup_create(KEYS.jobs, KEYS.group, id="0", mkstream=True)
    token_ids, _ = reference("hello", PARAMS)
    deliver_to(client, "w1", "mine", "hello")  # w1 read it, then crashed
    publish_tokens(client, "mine", ["x", "y"], token_ids[:2])
    start_worker(settings_for(redis_server.url, model_dir, lease_s=600))  # no lease expiry can help here
    evs = wait_final(client, "mine", timeout_s=30)
    assert assert_contiguous(evs) == token_ids and evs[-1].type == "done"


def test_a_worker_that_lost_its_lease_stops_writing(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    worker = start_worker(settings_for(redis_server.url, model_dir, lease_s=0.6))
    submit(client, "stolen", prompt="hello", params={"max_tokens": 240, "temperature": 0, "ignore_eos": True})
    wait_until(lambda: len(events(client, "stolen")) >= 2, what="first tokens")
    entry = client.xpending_range(KEYS.jobs, KEYS.group, "-", "+", 1)[0]["message_id"]
    client.xclaim(KEYS.jobs, KEYS.group, "thief", 0, [entry])  # another worker took it over
    wait_until(lambda: len(worker.worker.table) == 0, what="the worker to drop the job")
    written = len(events(client, "stolen"))
    # Quiet: the engine has let the job go and the publisher holds nothing more to write.
    wait_until(lambda: worker.worker.engine.stats().num_running == 0 and worker.worker.publisher.queue.empty(),
               what="the engine and the publisher to go quiet")
    evs = events(client, "stolen")
    assert len(evs) == written and all(e.type == "token" for e in evs)  # no more writes, no final
    assert client.xpending_range(KEYS.jobs, KEYS.group, "-", "+", 1)[0]["consumer"] == b"thief"
    assert worker.worker.engine.stats().num_running == 0
    wait_until(lambda: json.loads(client.get(KEYS.heartbeat("w1")))["jobs"] == 0, what="heartbeat update")
