"""The bad-input list: every malformed job gets an error event (when its id is readable) and a {p}:dead
letter with the raw payload, is acked, and the worker goes on serving the good jobs around it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import (
    KEYS,
    InProcessWorker,
    assert_contiguous,
    dead_entries,
    settings_for,
    submit,
    submit_raw,
    wait_final,
    wait_until,
)

MAX_JOB_BYTES = 4096

# (job id or None when unreadable, raw payload, expected code)
BAD_JOBS: list[tuple[str | None, bytes, str]] = [
    (None, b"{not json", "invalid_request"),
    (None, b"[1, 2, 3]", "invalid_request"),
    ("no-prompt", json.dumps({"id": "no-prompt", "params": {"max_tokens": 4}}).encode(), "invalid_request"),
    ("two-prompts", json.dumps({"id": "two-prompts", "prompt": "a", "prompt_token_ids": [1, 2]}).encode(),
     "invalid_request"),
    ("doubled-key", b'{"id": "doubled-key", "prompt": "a", "prompt": "b"}', "invalid_request"),
    ("wrong-type", json.dumps({"id": "wrong-type", "prompt": 42}).encode(), "invalid_request"),
    ("str-max-tokens", json.dumps({"id": "str-max-tokens", "prompt": "a", "params": {"max_tokens": "5"}}).encode(),
     "invalid_request"),
    ("neg-max-tokens", json.dumps({"id": "neg-max-tokens", "prompt": "a", "params": {"max_tokens": -3}}).encode(),
     "invalid_request"),
    ("huge-max-tokens", json.dumps({"id": "huge-max-tokens", "prompt": "a",
                                    "params": {"max_tokens": 10**12}}).encode(), "invalid_request"),
    ("unknown-field", json.dumps({"id": "unknown-field", "prompt": "a", "temperature": 0}).encode(),
     "invalid_request"),
    ("bad-value", json.dumps({"id": "bad-value", "prompt": "a", "params": {"top_p": 0}}).encode(),
     "invalid_request"),
    ("bad-token-id", json.dumps({"id": "bad-token-id", "prompt_token_ids": [1, 99999]}).encode(),
     "invalid_request"),
    ("too-long", json.dumps({"id": "too-long", "prompt_token_ids": [5] * 300}).encode(), "too_long"),
    ("too-big", json.dumps({"id": "too-big", "prompt": "x" * (MAX_JOB_BYTES + 10)}).encode(), "too_long"),
    ("not-utf8", b'{"id": "not-utf8", "prompt": "caf\xe9"}', "invalid_request"),
    # Structured outputs: a schema or regex xgrammar cannot compile, and two grammars at once.
    ("bad-schema", json.dumps({"id": "bad-schema", "prompt": "a", "params": {"response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}}).encode(),
     "invalid_request"),
    ("bad-regex", json.dumps({"id": "bad-regex", "prompt": "a", "params": {"regex": "(ab"}}).encode(),
     "invalid_request"),
    ("two-grammars", json.dumps({"id": "two-grammars", "prompt": "a",
                                 "params": {"regex": "a+", "choice": ["b"]}}).encode(), "invalid_request"),
]


def test_each_bad_job_gets_an_error_a_dead_letter_and_an_ack(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    start_worker(settings_for(redis_server.url, model_dir, max_job_bytes=MAX_JOB_BYTES))
    submit(client, "good-before", prompt="hello", params={"max_tokens": 4, "temperature": 0})
    for _, raw, _ in BAD_JOBS:
        submit_raw(client, raw)
    client.xadd(KEYS.jobs, {"not_job": b"x"})  # an entry without the job field at all
    submit(client, "good-after", prompt="hello", params={"max_tokens": 4, "temperature": 0})

    for good_id in ("good-before", "good-after"):
        evs = wait_final(client, good_id)
        assert evs[-1].type == "done" and len(assert_contiguous(evs)) == 4
    for bad_id, _, code in BAD_JOBS:
        if bad_id is not None:
            evs = wait_final(client, bad_id)
            assert [e.type for e in evs] == ["error"], bad_id
            assert evs[0].code == code, (bad_id, evs[0].message)
    wait_until(lambda: len(dead_entries(client)) == len(BAD_JOBS) + 1, what="every dead letter")
    dead = dead_entries(client)
    assert sorted(d["job"] for d in dead) == sorted([raw for _, raw, _ in BAD_JOBS] + [b""])
    for d in dead:
        assert d["code"] in (b"invalid_request", b"too_long") and d["reason"]
    by_raw = {d["job"]: d for d in dead}
    for job_id, raw, code in BAD_JOBS:
        assert by_raw[raw]["job_id"] == (job_id or "").encode() and by_raw[raw]["code"] == code.encode()
    wait_until(lambda: client.xpending(KEYS.jobs, KEYS.group)["pending"] == 0, what="every entry acked")


def test_expired_job_gets_error_expired_and_never_starts(
        redis_server: RedisServer, model_dir: Path, start_worker: Callable[..., InProcessWorker]) -> None:
    client: Any = redis_server.client()
    worker = start_worker(settings_for(redis_server.url, model_dir))
    submit(client, "late", prompt="hello", deadline_ms=1, params={"max_tokens": 4})
    submit(client, "in-time", prompt="hello", deadline_ms=2**62, params={"max_tokens": 4, "temperature": 0})
    evs = wait_final(client, "late")
    assert [(e.type, e.code) for e in evs] == [("error", "expired")]
    assert wait_final(client, "in-time")[-1].type == "done"
    # Never started: the engine generated only the in-time job's tokens.
    wait_until(lambda: worker.worker.engine.stats().num_generated_tokens == 4, what="engine stats")
    assert dead_entries(client) == []  # an expired job is not a bad job
