"""Async scheduling: step n+1 is scheduled and launched before step n's tokens reach the host.

The outputs must be exactly those of one step at a time, whatever ends a request (max_tokens, a stop
token under the step launched ahead, a stop string, an abort) and whatever the scheduler does around
it (chunked prefill, preemption, prefix hits, admission), and the steps launched ahead must really
happen (else the equality would hold trivially)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.scheduler import Scheduler
from tests.engine.test_scheduler import FakeRunner, make_request, make_scheduler


def _prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def _engine(model_dir: Path, async_scheduling: bool, **knobs: object) -> LLMEngine:
    options: dict[str, object] = {"num_kv_blocks": 256, "max_num_seqs": 8, **knobs}
    return LLMEngine(EngineConfig(model=str(model_dir), async_scheduling=async_scheduling,
                                  **options))  # type: ignore[arg-type]


def _count_ahead(engine: LLMEngine) -> list[int]:
    """Wrap schedule_ahead; the returned list counts the steps it launched."""
    launched = [0]
    original = engine.scheduler.schedule_ahead

    def counting() -> object:
        output = original()
        launched[0] += output is not None
        return output

    engine.scheduler.schedule_ahead = counting  # type: ignore[method-assign]
    return launched


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple]:
    """Tokens, finish reasons and texts exactly; logprobs to 1e-4 (a batch of another shape may round
    the last bits differently)."""
    outs = engine.generate(prompts, params)
    return [(o.token_ids, o.finish_reason, o.text,
             [{k: round(v, 4) for k, v in d.items()} for d in o.logprobs or []]) for o in outs]


KNOBS = {
    "plain": {},
    "chunked-prefill": {"max_num_batched_tokens": 8, "max_num_seqs": 4},
    "preemption": {"num_kv_blocks": 14, "block_size": 8},
    "priority": {"scheduling_policy": "priority", "max_num_seqs": 3},
}


@pytest.mark.parametrize("knobs", list(KNOBS.values()), ids=list(KNOBS))
def test_async_equals_sync(knobs: dict, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["llama"]
    sync = _engine(model_dir, False, **knobs)
    prompts = _prompts(sync.vocab_size, [3, 17, 40, 9, 30, 1, 33, 16], seed=3)
    # Greedy, seeded sampling with logprobs, max_tokens of 1 and 2 (the token launched ahead would be
    # past the end), stop token ids that end requests under a step launched ahead, and a stop string.
    first = sync.generate(prompts[:1], SamplingParams(max_tokens=20, temperature=0.0))[0].token_ids
    params = [
        SamplingParams(max_tokens=20, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=2, temperature=0.8, seed=5, logprobs=2),
        SamplingParams(max_tokens=25, temperature=0.0, stop_token_ids=[first[4]]),
        SamplingParams(max_tokens=18, temperature=1.0, top_p=0.9, seed=7),
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=1),
        SamplingParams(max_tokens=16, temperature=0.7, top_k=20, seed=11),
        SamplingParams(max_tokens=20, temperature=0.0, stop=[sync.tokenizer.decode(first[5:7])]),
    ]
    params[3] = SamplingParams(max_tokens=25, temperature=0.0, stop_token_ids=[first[4]])
    prompts[3] = prompts[0]  # the stop token comes after 5 tokens, mid-run
    prompts[7] = prompts[0]
    expected = _run(sync, prompts, params)
    engine = _engine(model_dir, True, **knobs)
    launched = _count_ahead(engine)
    assert _run(engine, prompts, params) == expected
    assert launched[0] > 0
    assert expected[3][1] == "stop" and len(expected[3][0]) == 5
    assert expected[7][1] == "stop"
    assert not engine.has_unfinished() and engine.core._inflight is None
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_total_blocks


def test_penalties_run_one_step_at_a_time(tiny_model_dirs: dict[str, Path]) -> None:
    """Penalties read the output tokens on the host: no step is launched ahead while one runs."""
    model_dir = tiny_model_dirs["llama"]
    sync = _engine(model_dir, False)
    prompts = _prompts(sync.vocab_size, [5, 12, 7], seed=4)
    params = [SamplingParams(max_tokens=10, temperature=0.0, repetition_penalty=1.3),
              SamplingParams(max_tokens=10, temperature=0.0),
              SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=0.5)]
    expected = _run(sync, prompts, params)
    engine = _engine(model_dir, True)
    launched = _count_ahead(engine)
    assert _run(engine, prompts, params) == expected
    assert launched[0] == 0
    # Without the penalised requests, the same engine launches ahead.
    assert _run(engine, prompts[1:2], params[1:2]) == expected[1:2]
    assert launched[0] > 0


def test_abort_and_add_between_steps(tiny_model_dirs: dict[str, Path]) -> None:
    """An abort while a step is in flight drops that request's in-flight token; a request added then
    is admitted by the next step scheduled with nothing in flight, and its output equals sync's."""
    model_dir = tiny_model_dirs["qwen3"]
    engine = _engine(model_dir, True)
    prompts = _prompts(engine.vocab_size, [6, 11, 9], seed=5)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    expected = {o.request_id: o.token_ids for o in _engine(model_dir, False).generate(prompts, greedy)}
    engine.add_request("a", prompt_token_ids=prompts[0], params=greedy)
    engine.add_request("b", prompt_token_ids=prompts[1], params=greedy)
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    finish: dict[str, str | None] = {}
    for _ in range(3):
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert engine.core._inflight is not None  # both decoding: a step is launched ahead
    engine.abort("a")
    engine.add_request("c", prompt_token_ids=prompts[2], params=greedy)
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert finish == {"a": "abort", "b": "length", "c": "length"}
    assert got["a"] == expected["generate-0-0"][:len(got["a"])] and len(got["a"]) < 8
    assert got["b"] == expected["generate-0-1"]
    assert got["c"] == expected["generate-0-2"]
    assert engine.core._inflight is None
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_total_blocks


# ---- the scheduler alone ---------------------------------------------------------------------


def _ahead(scheduler: Scheduler) -> dict[str, int]:
    output = scheduler.schedule_ahead()
    return {} if output is None else dict(output.num_scheduled_tokens)


def test_schedule_ahead_decodes_and_chunks() -> None:
    # No cap on a long prompt's chunk (long_prefill_token_threshold = the budget): "long" takes it all.
    scheduler = make_scheduler(num_kv_blocks=40, max_num_batched_tokens=20, long_prefill_token_threshold=20)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("long", 30, max_tokens=5))
    scheduler.add_request(make_request("short", 4, max_tokens=2))
    first = scheduler.schedule()
    assert dict(first.num_scheduled_tokens) == {"long": 20}  # budget: "short" waits
    assert scheduler.can_schedule_ahead() is False  # "short" could be admitted now
    scheduler.update_from_output(first, runner.execute(first))
    second = scheduler.schedule()
    assert dict(second.num_scheduled_tokens) == {"long": 10, "short": 4}
    assert scheduler.can_schedule_ahead()
    # Both samples are in flight: one decode token each, counted from their in-flight progress.
    ahead = scheduler.schedule_ahead()
    assert ahead is not None and dict(ahead.num_scheduled_tokens) == {"long": 1, "short": 1}
    assert [c.num_computed_tokens for c in ahead.cached_requests] == [30, 4]
    scheduler.update_from_output(second, runner.execute(second))
    # "short" (max_tokens 2) gets its last token from `ahead`: nothing more for it.
    assert _ahead(scheduler) == {"long": 1}


def test_schedule_ahead_leaves_out_the_last_token() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("one", 5, max_tokens=1))
    scheduler.add_request(make_request("two", 5, max_tokens=3))
    scheduler.schedule()
    assert _ahead(scheduler) == {"two": 1}  # "one" ends with the token in flight


def test_schedule_ahead_never_preempts() -> None:
    """Out of blocks, schedule_ahead stops; the next schedule() (nothing in flight) preempts."""
    scheduler = make_scheduler(num_kv_blocks=4, max_num_seqs=2)  # 3 usable blocks of 8 tokens
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 8, max_tokens=10))
    scheduler.add_request(make_request("b", 12, max_tokens=10))
    first = scheduler.schedule()
    assert dict(first.num_scheduled_tokens) == {"a": 8, "b": 12} and scheduler.num_free_blocks == 0
    ahead = scheduler.schedule_ahead()  # "a" needs a third block for its 9th token: none free
    assert ahead is None and scheduler.num_preemptions == 0
    assert scheduler.can_schedule_ahead() is False
    scheduler.update_from_output(first, runner.execute(first))
    second = scheduler.schedule()
    assert second.preempted_req_ids == {"b"}
    # "b" waits for blocks "a" holds: launching ahead goes on meanwhile.
    assert scheduler.can_schedule_ahead()
    assert _ahead(scheduler) == {"a": 1}


def test_request_fields_track_inflight() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    request: Request = make_request("r", 9, max_tokens=4)
    scheduler.add_request(request)
    first = scheduler.schedule()
    assert (request.num_computed_tokens, request.num_inflight_tokens) == (0, 9)
    ahead = scheduler.schedule_ahead()
    assert ahead is not None and request.num_inflight_tokens == 10
    scheduler.update_from_output(first, runner.execute(first))
    assert (request.num_computed_tokens, request.num_inflight_tokens, request.num_tokens) == (9, 1, 10)
