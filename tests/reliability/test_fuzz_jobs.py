"""Property-based fuzzing of job payloads (hypothesis), pushed raw with XADD to a running `python -m worker`:
the worker never crashes or hits a catch-all handler, and every entry ends in a `done` event, an `error`
event or a {p}:dead letter, and is acknowledged.

Scale: 200 examples (no shrinking deadline), payloads capped at max_job_bytes=4096, max_model_len 256."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api_client.keys import JOB_FIELD
from tests.helpers.redis_server import RedisServer
from tests.reliability.conftest import KEYS, WorkerProcess, read_results, wait_until

pytestmark = pytest.mark.reliability

MAX_JOB_BYTES = 4096
NUM_EXAMPLES = 200
PER_EXAMPLE_TIMEOUT_S = 60.0
UNIQUE = "<unique id>"  # replaced by a fresh valid id at push time: a repeated id would be skipped as served

PARAM_NAMES = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs"]
BIG_INTS = st.sampled_from([2**31, 2**63, -(2**63), 10**30])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), BIG_INTS,
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
JSONISH = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                       max_leaves=8)


def _param_value(name: str) -> st.SearchStrategy[Any]:
    if name == "max_tokens":  # valid values stay small: the engine must not run long on one example
        return st.one_of(st.integers(-2, 12), BIG_INTS, SCALARS)
    if name in ("stop", "stop_token_ids"):
        return st.one_of(st.lists(st.one_of(st.text(max_size=4), st.integers(-2, 400)), max_size=4), JSONISH)
    return st.one_of(SCALARS, JSONISH)


PARAMS = st.one_of(
    st.dictionaries(st.sampled_from([*PARAM_NAMES, "logits_processors", "model", "bogus"]),
                    st.just(None), max_size=5).flatmap(
        lambda d: st.fixed_dictionaries({k: _param_value(k) for k in d})),
    JSONISH)
IDS = st.one_of(st.just(UNIQUE), st.integers(), st.just(""), st.just("x" * 300), st.just("../../etc/passwd"),
                st.text(max_size=8).map(lambda s: s + UNIQUE))
MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "", "evil"]),
                                    "content": st.text(max_size=30)}), max_size=3),
    st.lists(JSONISH, max_size=3), JSONISH)
PROMPT_IDS = st.one_of(st.lists(st.integers(-2, 400), max_size=20), st.lists(st.just(5), min_size=300, max_size=300),
                       JSONISH)
PROMPTS = st.one_of(st.text(max_size=60), st.just("{{ 7 * 7 }} /etc/passwd __import__('os')"),
                    st.text(min_size=1, max_size=2).map(lambda s: s * 3000), JSONISH)
JOBS = st.fixed_dictionaries({}, optional={
    "id": IDS, "prompt": PROMPTS, "messages": MESSAGES, "prompt_token_ids": PROMPT_IDS, "params": PARAMS,
    "priority": st.one_of(st.integers(-5, 5), BIG_INTS, SCALARS),
    "deadline_ms": st.one_of(st.integers(0, 10), st.just(2**62), SCALARS),
    "result_ttl_s": st.one_of(st.integers(-1, 100), SCALARS), "extra": JSONISH})

VALID_PARAMS = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1.0),
    "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.5, 2.0),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "seed": st.integers(0, 2**63 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3), "stop_token_ids": st.lists(st.integers(0, 300),
                                                                                          max_size=3),
    "ignore_eos": st.booleans(), "logprobs": st.integers(0, 5)})
VALID_JOBS = st.fixed_dictionaries(
    {"params": VALID_PARAMS},
    optional={"id": st.just(UNIQUE), "priority": st.integers(-5, 5), "result_ttl_s": st.integers(1, 600)}).flatmap(
    lambda job: st.one_of(
        st.builds(lambda p: {**job, "prompt": p}, st.text(min_size=1, max_size=60)),
        st.builds(lambda m: {**job, "messages": m}, st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}),
            min_size=1, max_size=3)),
        st.builds(lambda t: {**job, "prompt_token_ids": t}, st.lists(st.integers(0, 300), min_size=1, max_size=40))))


@st.composite
def one_bad_field(draw: st.DrawFn) -> dict[str, Any]:
    """A valid job with one field (top level or in params) replaced by a random JSON value."""
    job: dict[str, Any] = draw(VALID_JOBS)
    params: dict[str, Any] = job["params"]
    target = draw(st.sampled_from([*job, *(f"params.{k}" for k in PARAM_NAMES)]))
    value = draw(JSONISH)
    if target.startswith("params."):
        params[target.removeprefix("params.")] = value
    else:
        job[target] = value
    return job


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, bytes]:
    """(stream field name, raw payload): mostly job-shaped JSON, also broken JSON, raw bytes, other fields."""
    kind = draw(st.sampled_from(["valid"] * 3 + ["one_bad"] * 3 + ["job"] * 3 + ["mutated", "bytes", "json",
                                                                                  "field"]))
    if kind == "bytes":
        return JOB_FIELD, draw(st.binary(max_size=200))
    if kind == "json":
        return JOB_FIELD, json.dumps(draw(JSONISH)).encode()
    job = draw(VALID_JOBS if kind == "valid" else one_bad_field() if kind == "one_bad" else JOBS)
    text = json.dumps(job, ensure_ascii=draw(st.booleans()))
    if kind == "mutated":  # cut, or a byte dropped in: mostly broken UTF-8 or JSON
        data = text.encode()
        cut = draw(st.integers(0, len(data)))
        return JOB_FIELD, data[:cut] + draw(st.binary(max_size=3)) + data[cut + draw(st.integers(0, 2)):]
    if kind == "field":
        return draw(st.sampled_from(["jobs", "Job", "payload", ""])), text.encode()
    return JOB_FIELD, text.encode()


def candidate_ids(entry_id: str, raw: bytes) -> list[str]:
    """Where a final event may land: the job's own id when it has one, else the entry id."""
    ids = [entry_id]
    try:
        obj = json.loads(raw)
    except ValueError:
        return ids
    if isinstance(obj, dict) and isinstance(obj.get("id"), str) and obj["id"]:
        ids.append(obj["id"])
    return ids


def is_pending(client: Any, entry_id: str) -> bool:
    return bool(client.xpending_range(KEYS.jobs, KEYS.group, entry_id, entry_id, 1))


def test_fuzzed_payloads_never_crash_the_worker_and_all_end(workers: Callable[..., WorkerProcess]) -> None:
    counter = itertools.count()
    outcomes: dict[str, int] = {"done": 0, "error": 0, "dead": 0}
    with RedisServer() as server:
        client: Any = server.client()
        worker = workers(server.url, "w1", max_job_bytes=MAX_JOB_BYTES, max_num_seqs=8)
        wait_until(lambda: "worker ready" in worker.log_path.read_text(errors="replace"), timeout_s=120,
                   what="worker ready")
        dead_cursor = ["0-0"]

        @settings(max_examples=NUM_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(payloads())
        def check(payload: tuple[str, bytes]) -> None:
            field, raw = payload
            raw = raw.replace(UNIQUE.encode(), f"fz-{next(counter)}".encode())
            entry_id = client.xadd(KEYS.jobs, {field: raw}).decode()
            ids = candidate_ids(entry_id, raw)
            expected_dead_job = raw if field == JOB_FIELD else b""
            deadline = time.monotonic() + PER_EXAMPLE_TIMEOUT_S
            while True:
                assert worker.is_alive, worker.logs()[-3000:]
                new_dead = client.xrange(KEYS.dead, f"({dead_cursor[0]}", "+")
                if new_dead:
                    dead_cursor[0] = new_dead[-1][0].decode()
                finals = [evs[-1] for evs in read_results(client, ids).values() if evs and evs[-1].is_final]
                dead = [f for _, f in new_dead if f.get(JOB_FIELD.encode()) == expected_dead_job]
                if finals or dead:
                    break
                assert time.monotonic() < deadline, (f"no final event nor dead letter for {raw[:200]!r}",
                                                     worker.logs()[-3000:])
                time.sleep(0.01)
            wait_until(lambda: not is_pending(client, entry_id), timeout_s=10, what="the entry acked")
            outcomes[finals[0].type if finals else "dead"] += 1

        check()
        assert worker.is_alive
        # Every payload went through the intended paths: no catch-all handler fired, nothing was logged
        # as an error, no traceback.
        log = worker.logs()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
        # The fuzzer reached all three endings, so the property was not met vacuously.
        assert all(outcomes.values()), outcomes  # e.g. {done: 72, error: 28, dead: 100}
        # And the worker still serves a plain job.
        client.xadd(KEYS.jobs, {JOB_FIELD: json.dumps({"id": "after-fuzz", "prompt": "hello",
                                                       "params": {"max_tokens": 3}})})
        wait_until(lambda: bool(evs := read_results(client, ["after-fuzz"])["after-fuzz"])
                   and evs[-1].type == "done", timeout_s=60, what="a plain job after the fuzzing")
