"""BatchStore on a fresh redis-server without a worker: files and their limits, jobs queued in the batch
lane with ids that make a resubmission queue nothing twice, the list's pages, one collector at a time,
and the ends a batch reaches with no worker: cancelled, expired."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api_client.batches import BatchApiError, BatchConfig, BatchStore, read_jsonl
from api_client.keys import JOB_FIELD, Keys
from api_client.schema import parse_job
from tests.helpers.redis_server import RedisServer

KEYS = Keys("bt")


def _line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": custom_id}], "max_tokens": 4, **body}}


def _store(server: RedisServer, **config: Any) -> tuple[BatchStore, Any]:
    r = server.client()
    return BatchStore(r, KEYS, BatchConfig(**config)), r


def test_files_are_checked_and_expire(redis_server: RedisServer) -> None:
    store, r = _store(redis_server, max_file_bytes=100, file_ttl_s=600)
    meta = store.create_file(b'{"a": 1}\n', "in.jsonl", "batch")
    assert store.file(meta["id"]) == meta and store.file_content(meta["id"]) == b'{"a": 1}\n'
    assert 0 < r.ttl(KEYS.file(meta["id"])) <= 600 and meta["expires_at"] - meta["created_at"] == 600
    with pytest.raises(BatchApiError, match="over the limit") as too_big:
        store.create_file(b"x" * 101, "big.jsonl", "batch")
    assert too_big.value.status == 400
    with pytest.raises(BatchApiError, match="purpose"):
        store.create_file(b"{}\n", "in.jsonl", "assistants")
    with pytest.raises(BatchApiError) as missing:
        store.file("file-nope")
    assert missing.value.status == 404


def test_lines_become_batch_lane_jobs_and_a_resubmission_queues_nothing_twice(redis_server: RedisServer) -> None:
    store, r = _store(redis_server)
    content = read_jsonl([_line("a"), _line("b", n=2), "{broken", _line("a"), _line("c", stream=True)])
    batch = store.create_batch(store.create_file(content, "in.jsonl", "batch")["id"], "/v1/chat/completions")
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 5
    entries = r.xrange(KEYS.lane_jobs("batch"))
    jobs = [parse_job(fields[JOB_FIELD.encode()]) for _, fields in entries]
    assert [j.id for j in jobs] == [f"{batch['id']}.1", f"{batch['id']}.2.0", f"{batch['id']}.2.1"]
    assert {j.lane for j in jobs} == {"batch"} and all(j.deadline_ms == batch["expires_at"] * 1000 for j in jobs)
    assert r.xlen(KEYS.jobs) == 0  # nothing in the interactive lane
    r.hset(KEYS.batch(batch["id"]), "status", "validating")  # as if its creator died midway
    assert not store.collect(batch["id"], "replica-2")  # finishes the submission
    assert r.xlen(KEYS.lane_jobs("batch")) == 3 and store.batch(batch["id"])["status"] == "in_progress"


def test_one_collector_at_a_time_then_cancel_without_a_worker(redis_server: RedisServer) -> None:
    store, r = _store(redis_server, lock_ttl_s=30)
    batch = store.create_batch(store.create_file(read_jsonl([_line("a"), _line("b"), "[]"]), "x", "batch")["id"],
                               "/v1/chat/completions")
    assert not store.collect(batch["id"], "one")  # holds the lock now; the lines wait for a worker
    assert r.get(KEYS.batch_lock(batch["id"])) == b"one"
    assert store.batch(batch["id"])["request_counts"] == {"total": 3, "completed": 0, "failed": 1}
    assert not store.collect(batch["id"], "two")  # the lock is taken: no second collector
    assert store.cancel(batch["id"])["status"] == "cancelling"
    assert r.exists(KEYS.cancel(f"{batch['id']}.1")) == 1  # a worker that reads it later skips it
    assert store.collect(batch["id"], "one")
    done = store.batch(batch["id"])
    assert done["status"] == "cancelled" and done["output_file_id"] is None
    assert done["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    rows = [json.loads(x) for x in store.file_content(done["error_file_id"]).splitlines()]
    assert [(row["custom_id"], row["error"]["code"]) for row in rows] == [
        ("a", "batch_cancelled"), ("b", "batch_cancelled"), (None, "invalid_request")]
    assert store.cancel(batch["id"])["status"] == "cancelled"  # cancelling a finished batch changes nothing
    assert batch["id"] not in store.open_batches() and r.ttl(KEYS.batch(batch["id"])) > 0


def test_lines_not_run_within_the_window_expire(redis_server: RedisServer) -> None:
    store, r = _store(redis_server)
    batch = store.create_batch(store.create_file(read_jsonl([_line("late")]), "x", "batch")["id"],
                               "/v1/chat/completions")
    r.hset(KEYS.batch(batch["id"]), "expires_at", json.dumps(batch["created_at"] - 1))
    assert store.collect(batch["id"], "one")
    done = store.batch(batch["id"])
    assert done["status"] == "expired" and done["expired_at"] is not None
    row = json.loads(store.file_content(done["error_file_id"]))
    assert (row["custom_id"], row["response"], row["error"]["code"]) == ("late", None, "batch_expired")


def test_the_list_pages_newest_first(redis_server: RedisServer) -> None:
    store, _ = _store(redis_server)
    file_id = store.create_file(read_jsonl([_line("a")]), "x", "batch")["id"]
    ids = [store.create_batch(file_id, "/v1/chat/completions")["id"] for _ in range(3)]
    first = store.list_batches(limit=2)
    assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = store.list_batches(after=first["last_id"], limit=2)
    assert [b["id"] for b in rest["data"]] == [ids[0]] and not rest["has_more"]
    with pytest.raises(BatchApiError, match="limit"):
        store.list_batches(limit=0)
    with pytest.raises(BatchApiError, match="endpoint"):
        store.create_batch(file_id, "/v1/embeddings")


def test_the_tagged_layout_refuses_batches_and_keeps_lanes(redis_server: RedisServer) -> None:
    from api_client.client import Client

    with pytest.raises(ValueError, match="Batch API is not available"):
        BatchStore(redis_server.client(), Keys("bt2", num_shards=2))
    client = Client(redis_server.url, prefix="bt2", num_shards=2)
    with pytest.raises(ValueError, match="Batch API is not available"):
        client.submit_batch([_line("a")])
    job_id = client.submit(prompt="x", max_tokens=1, lane="batch")
    r = redis_server.client()
    assert r.xlen(Keys("bt2", num_shards=2).for_job(job_id).lane_jobs("batch")) == 1
