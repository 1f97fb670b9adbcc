"""Scheduler on the CPU with a fake KV configuration and a fake runner that checks every SchedulerOutput
against the state a real runner would keep (token ids, block table, num_computed_tokens)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from engine.block_pool import NULL_BLOCK_ID
from engine.config import EngineConfig
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

BLOCK_SIZE = 8  # the smallest EngineConfig accepts
TOKEN = 7  # what the fake runner samples unless told otherwise
_prompt_bases = itertools.count(10_000, 10_000)  # distinct prompts: no accidental prefix hits


def make_scheduler(num_kv_blocks: int = 11, max_model_len: int = 256, **overrides: object) -> Scheduler:
    options: dict[str, object] = {"max_num_seqs": 4, "max_num_batched_tokens": 64, **overrides}
    config = EngineConfig(model="fake", block_size=BLOCK_SIZE, num_kv_blocks=num_kv_blocks,
                          **options)  # type: ignore[arg-type]
    return Scheduler(config, num_kv_blocks=num_kv_blocks, max_model_len=max_model_len)


def make_request(req_id: str, prompt: list[int] | int, max_tokens: int = 16, priority: int = 0,
                 **params: object) -> Request:
    if isinstance(prompt, int):
        base = next(_prompt_bases)
        prompt = list(range(base, base + prompt))
    return Request(request_id=req_id, prompt_token_ids=prompt, priority=priority,
                   sampling_params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
                   eos_token_ids=frozenset({2}))


@dataclass
class RunnerState:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class FakeRunner:
    """Keeps per-request state from SchedulerOutputs only, as the model runner does, and checks them."""

    scheduler: Scheduler
    states: dict[str, RunnerState] = field(default_factory=dict)

    def execute(self, output: SchedulerOutput, token_id: int = TOKEN) -> ModelRunnerOutput:
        for req_id in output.finished_req_ids:
            self.states.pop(req_id, None)
        assert output.preempted_req_ids <= output.finished_req_ids
        for new in output.new_requests:
            assert new.req_id not in self.states
            self.states[new.req_id] = RunnerState(list(new.token_ids), list(new.block_ids),
                                                  new.num_computed_tokens)
        for cached in output.cached_requests:
            state = self.states[cached.req_id]
            assert cached.num_computed_tokens == state.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)
        assert output.total_num_scheduled_tokens == sum(output.num_scheduled_tokens.values())
        assert output.total_num_scheduled_tokens <= self.scheduler.config.max_num_batched_tokens
        assert len(output.num_scheduled_tokens) == len(output.new_requests) + len(output.cached_requests)
        sampled: dict[str, int] = {}
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            state = self.states[req_id]
            end = state.num_computed_tokens + num_tokens
            assert num_tokens > 0 and end <= len(state.token_ids)
            assert len(state.block_ids) == -(-end // self.scheduler.block_size)  # exactly the blocks needed
            assert NULL_BLOCK_ID not in state.block_ids
            state.num_computed_tokens = end
            if end == len(state.token_ids):
                sampled[req_id] = token_id
                state.token_ids.append(token_id)
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def step(self, token_id: int = TOKEN) -> tuple[SchedulerOutput, list[Request]]:
        output = self.scheduler.schedule()
        return output, self.scheduler.update_from_output(output, self.execute(output, token_id))


def test_decodes_come_before_a_new_prefill() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 5))
    scheduler.add_request(make_request("b", 6))
    output, updated = runner.step()
    assert [n.req_id for n in output.new_requests] == ["a", "b"]
    assert output.num_scheduled_tokens == {"a": 5, "b": 6}
    assert [r.request_id for r in updated] == ["a", "b"] and updated[0].output_token_ids == [TOKEN]
    scheduler.add_request(make_request("c", 9))
    output, _ = runner.step()
    assert list(output.num_scheduled_tokens.items()) == [("a", 1), ("b", 1), ("c", 9)]
    assert [c.req_id for c in output.cached_requests] == ["a", "b"]
    assert [c.num_computed_tokens for c in output.cached_requests] == [5, 6]
    assert [n.req_id for n in output.new_requests] == ["c"]


def test_chunked_prefill_under_a_small_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(scheduler)
    prompt = list(range(100, 120))
    scheduler.add_request(make_request("a", prompt))
    chunks = []
    for step in range(3):
        output, updated = runner.step()
        chunks.append(output.num_scheduled_tokens["a"])
        if step == 0:
            assert output.new_requests[0].token_ids == prompt
            assert output.new_requests[0].num_computed_tokens == 0
            assert len(output.new_requests[0].block_ids) == 1
        else:
            assert output.cached_requests[0].num_computed_tokens == 8 * step
        assert updated == ([] if step < 2 else [scheduler.get_request("a")])
    assert chunks == [8, 8, 4]
    request = scheduler.get_request("a")
    assert request is not None and request.num_computed_tokens == 20 and request.output_token_ids == [TOKEN]
    # The leftover budget of the last chunk admits the next prompt in the same step (mixed batch).
    scheduler.add_request(make_request("b", 10))
    output, _ = runner.step()
    assert output.num_scheduled_tokens == {"a": 1, "b": 7}


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeRunner(scheduler)
    for req_id in "abc":
        scheduler.add_request(make_request(req_id, 3, max_tokens=2))
    output, _ = runner.step()
    assert set(output.num_scheduled_tokens) == {"a", "b"}
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    output, updated = runner.step()  # a and b reach max_tokens
    assert set(output.num_scheduled_tokens) == {"a", "b"} and all(r.is_finished for r in updated)
    output, _ = runner.step()
    assert [n.req_id for n in output.new_requests] == ["c"] and output.finished_req_ids == {"a", "b"}


def test_second_request_hits_the_prefix_of_the_first() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    prompt = list(range(300, 317))  # 17 tokens: two full blocks and one token
    scheduler.add_request(make_request("a", prompt))
    runner.step()
    scheduler.add_request(make_request("b", [*prompt]))
    output, _ = runner.step()
    new = output.new_requests[0]
    assert new.req_id == "b" and new.num_computed_tokens == 16 and output.num_scheduled_tokens["b"] == 1
    assert new.block_ids[:2] == scheduler.kv_cache_manager.get_block_ids("a")[:2]
    b = scheduler.get_request("b")
    assert b is not None and b.num_cached_tokens == 16
    assert scheduler.prefix_cache_hit_rate == pytest.approx(16 / 34)


def test_blocks_filled_by_decodes_enter_the_prefix_cache_at_each_boundary() -> None:
    # update_from_output registers blocks only when num_computed_tokens crosses a block boundary, and
    # schedule() allocates only there: check both against what a later request can hit.
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", list(range(400, 405)), max_tokens=30))  # 5 prompt tokens
    pool = scheduler.kv_cache_manager.block_pool
    num_cached_blocks = []
    for _ in range(19):  # a computes its prompt, then one token per step: 5 + 18 = 23 tokens
        runner.step()
        a = scheduler.get_request("a")
        assert a is not None
        num_cached_blocks.append(pool.num_cached_blocks)
        assert pool.num_cached_blocks == a.num_computed_tokens // BLOCK_SIZE
        assert len(scheduler.kv_cache_manager.get_block_ids("a")) == -(-a.num_computed_tokens // BLOCK_SIZE)
    assert a is not None and num_cached_blocks[-1] == 2 and a.num_computed_tokens == 23
    scheduler.add_request(make_request("b", list(a.all_token_ids[:17])))
    output, _ = runner.step()
    new = output.new_requests[0]
    assert new.req_id == "b" and new.num_computed_tokens == 16  # block 1 was filled by decodes alone
    assert new.block_ids[:2] == scheduler.kv_cache_manager.get_block_ids("a")[:2]


@pytest.mark.parametrize("budget", [2, 3, 7, 9, 16, 17])
def test_chunks_get_exactly_the_blocks_they_need(budget: int) -> None:
    # schedule() skips allocate_slots while a request's tokens fit its last block; FakeRunner asserts every
    # step that each request holds exactly the blocks of its computed tokens, chunk boundaries included.
    scheduler = make_scheduler(num_kv_blocks=40, max_num_seqs=2, max_num_batched_tokens=budget)
    runner = FakeRunner(scheduler)
    for index, num_prompt in enumerate((17, 9, 25, 1)):
        scheduler.add_request(make_request(f"r{index}", num_prompt, max_tokens=11))
    while scheduler.has_unfinished_requests():
        runner.step()
    assert scheduler.num_free_blocks == scheduler.num_total_blocks


def test_preempted_request_comes_back_with_all_its_tokens() -> None:
    scheduler = make_scheduler(num_kv_blocks=5)  # 4 usable blocks of 8
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 16, max_tokens=2))
    scheduler.add_request(make_request("b", 16, max_tokens=4))
    runner.step()  # both prefilled: every block in use
    assert scheduler.num_free_blocks == 0
    scheduler.add_request(make_request("c", 3, max_tokens=1))  # waits for a block
    output, _ = runner.step()  # a needs a third block for its 17th token: b (the newest) is preempted
    b = scheduler.get_request("b")
    assert b is not None and b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert output.preempted_req_ids == {"b"} and "b" in output.finished_req_ids
    assert output.num_scheduled_tokens == {"a": 1} and output.new_requests == []
    assert scheduler.num_preemptions == 1 and b.num_preemptions == 1
    output, _ = runner.step()  # a finished last step; b is recomputed, output token included
    assert [n.req_id for n in output.new_requests] == ["b", "c"]  # b went back to the front (fcfs)
    new = output.new_requests[0]
    assert new.token_ids == [*b.prompt_token_ids, TOKEN] and new.num_prompt_tokens == 16
    assert new.num_computed_tokens == 8  # its first block survived in the prefix cache
    assert output.num_scheduled_tokens == {"b": 9, "c": 3} and output.finished_req_ids == {"a"}
    while scheduler.has_unfinished_requests():
        runner.step()
    assert b.output_token_ids == [TOKEN] * 4 and b.status is RequestStatus.FINISHED_LENGTH


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_victim_choice_depends_on_the_policy(policy: str) -> None:
    scheduler = make_scheduler(num_kv_blocks=5, scheduling_policy=policy)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("low", 12, priority=1))
    runner.step()
    scheduler.add_request(make_request("high", 16, priority=0))
    runner.step()  # low decodes in its second block, high fills the last two blocks
    assert scheduler.num_free_blocks == 0
    output, _ = runner.step()  # low fits; high needs a third block
    if policy == "fcfs":
        # The newest running request is high itself: it is preempted and the step goes on without it.
        assert output.preempted_req_ids == {"high"} and output.num_scheduled_tokens == {"low": 1}
    else:
        # low was already scheduled this step: its step is undone and its blocks go to high.
        assert output.preempted_req_ids == {"low"} and output.num_scheduled_tokens == {"high": 1}
        assert [c.req_id for c in output.cached_requests] == ["high"]
        assert output.total_num_scheduled_tokens == 1


def test_priority_victim_is_the_newest_among_equals() -> None:
    scheduler = make_scheduler(num_kv_blocks=5, scheduling_policy="priority")
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("old", 16, priority=3))
    scheduler.add_request(make_request("new", 6, priority=3))
    scheduler.add_request(make_request("vip", 3, max_tokens=2, priority=0))
    output, _ = runner.step()
    assert list(output.num_scheduled_tokens) == ["vip", "old", "new"]  # admitted by (priority, arrival)
    assert scheduler.num_free_blocks == 0
    scheduler.add_request(make_request("vip2", 5, priority=0))  # waits: no block left
    output, _ = runner.step()  # old needs a block for its 17th token; vip finishes
    assert output.preempted_req_ids == {"new"} and output.new_requests == []
    assert list(output.num_scheduled_tokens) == ["vip", "old"]
    output, _ = runner.step()  # vip's block goes to vip2, ahead of the preempted low-priority request
    assert [n.req_id for n in output.new_requests] == ["vip2"]
    assert [r.request_id for r in scheduler.running] == ["old", "vip2"] and scheduler.num_waiting == 1


def test_abort_frees_blocks_and_is_reported() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 20))
    scheduler.add_request(make_request("w", 4))
    stale_output = scheduler.schedule()
    assert scheduler.num_free_blocks == scheduler.num_total_blocks - 3
    finished = scheduler.finish_requests(["a", "w", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in finished] == ["a", "w"]
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in finished)
    assert scheduler.num_free_blocks == scheduler.num_total_blocks
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0
    assert not scheduler.has_unfinished_requests()
    # The step already in flight for "a" comes back: ignored.
    assert scheduler.update_from_output(stale_output, ModelRunnerOutput({"a": TOKEN})) == []
    output, _ = runner.step()
    assert output.finished_req_ids == {"a", "w"} and output.is_empty


@pytest.mark.parametrize(("params", "tokens", "status"), [
    ({}, [5, 2], RequestStatus.FINISHED_STOPPED),  # EOS, kept in the output
    ({"ignore_eos": True}, [5, 2, 5, 5], RequestStatus.FINISHED_LENGTH),
    ({"stop_token_ids": [9]}, [5, 9], RequestStatus.FINISHED_STOPPED),
    ({}, [5, 5, 5, 5], RequestStatus.FINISHED_LENGTH),  # max_tokens
])
def test_stops(params: dict[str, Any], tokens: list[int], status: RequestStatus) -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    request = make_request("a", 3, max_tokens=4, **params)
    scheduler.add_request(request)
    for token_id in tokens:
        assert not request.is_finished
        _, updated = runner.step(token_id)
        assert updated == [request]
    assert request.status is status and request.output_token_ids == tokens
    assert scheduler.num_free_blocks == scheduler.num_total_blocks and scheduler.num_running == 0
    output, _ = runner.step()
    assert output.finished_req_ids == {"a"} and output.is_empty


def test_max_model_len_stops_generation() -> None:
    scheduler = make_scheduler(max_model_len=12)
    runner = FakeRunner(scheduler)
    request = make_request("a", 10, max_tokens=100)
    scheduler.add_request(request)
    runner.step()
    assert not request.is_finished
    runner.step()
    assert request.status is RequestStatus.FINISHED_LENGTH and request.num_tokens == 12


def test_waiting_served_ratio_holds_prompts_back() -> None:
    scheduler = make_scheduler(waiting_served_ratio=2.0)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 4, max_tokens=50))
    output, _ = runner.step()
    assert [n.req_id for n in output.new_requests] == ["a"]  # nothing running: admitted at once
    scheduler.add_request(make_request("b", 4))
    output, _ = runner.step()
    assert output.new_requests == [] and scheduler.num_waiting == 1  # 1 waiting < 2.0 * 1 running
    scheduler.add_request(make_request("c", 4))
    output, _ = runner.step()
    assert [n.req_id for n in output.new_requests] == ["b", "c"]


def test_max_waiting_steps_forces_admission() -> None:
    scheduler = make_scheduler(waiting_served_ratio=10.0, max_waiting_steps=3)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 4, max_tokens=50))
    runner.step()
    scheduler.add_request(make_request("b", 4))
    admitted_at = [step for step in range(1, 6) if runner.step()[0].new_requests]
    assert admitted_at == [4]  # after steps 1-3 passed without an admission
    scheduler.add_request(make_request("c", 4))  # the count restarts at b's admission
    admitted_at = [step for step in range(6, 11) if runner.step()[0].new_requests]
    assert admitted_at == [8]


def test_without_ratio_prompts_are_admitted_at_once() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 4, max_tokens=50))
    runner.step()
    scheduler.add_request(make_request("b", 4))
    output, _ = runner.step()
    assert [n.req_id for n in output.new_requests] == ["b"]


def test_add_request_rejects_what_can_never_run() -> None:
    scheduler = make_scheduler(num_kv_blocks=5, max_model_len=100)  # 4 blocks: 32 tokens of KV
    with pytest.raises(PromptTooLongError, match="100"):
        scheduler.add_request(make_request("long", 100))
    scheduler.add_request(make_request("fits_len", 31))  # 31 + 1 = 32 tokens: 4 blocks
    with pytest.raises(PromptTooLongError, match="5 KV blocks"):
        scheduler.add_request(make_request("too_many_blocks", 32))
    with pytest.raises(InvalidRequestError) as info:
        scheduler.add_request(make_request("fits_len", 3))
    assert not isinstance(info.value, PromptTooLongError)
    assert scheduler.num_waiting == 1


def test_kv_waste_stays_small_on_the_benchmark_workload() -> None:
    rng = random.Random(0)
    lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(32)]
    num_kv_blocks = sum(-(-(p + o) // 16) for p, o in lengths) + 1
    config = EngineConfig(model="fake", block_size=16, num_kv_blocks=num_kv_blocks)
    scheduler = Scheduler(config, num_kv_blocks=num_kv_blocks, max_model_len=4096)
    for index, (num_prompt, num_output) in enumerate(lengths):
        prompt = [rng.randrange(32000) for _ in range(num_prompt)]
        scheduler.add_request(Request(request_id=f"r{index}", prompt_token_ids=prompt, sampling_params=SamplingParams(
            max_tokens=num_output, ignore_eos=True)))
    runner = FakeRunner(scheduler)
    peak_usage, waste_at_peak = 0.0, 1.0
    requests = [scheduler.get_request(f"r{i}") for i in range(32)]
    while scheduler.has_unfinished_requests():
        runner.step()
        if scheduler.kv_usage > peak_usage:
            peak_usage, waste_at_peak = scheduler.kv_usage, scheduler.kv_waste()
    assert scheduler.num_preemptions == 0 and peak_usage > 0.5
    assert 0.0 < waste_at_peak < 0.04
    assert [r.num_output_tokens for r in requests if r is not None] == [o for _, o in lengths]


def test_no_admission_in_a_step_that_preempted() -> None:
    scheduler = make_scheduler(num_kv_blocks=5, scheduling_policy="priority")
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 16))
    scheduler.add_request(make_request("b", 16))
    runner.step()
    scheduler.add_request(make_request("c", 3, priority=-1))  # would fit in the block b leaves over
    output, _ = runner.step()  # a needs a block: b is preempted, one of its two blocks stays free
    assert output.preempted_req_ids == {"b"} and output.new_requests == []
    assert scheduler.num_free_blocks == 1
    output, _ = runner.step()
    assert [n.req_id for n in output.new_requests] == ["c"]


def test_a_lone_arrival_under_waiting_served_ratio_is_admitted_within_the_default_bound() -> None:
    # TGI pairs waiting_served_ratio with max_waiting_tokens=20: without a bound, a prompt that arrives
    # alone beside ten running requests (1 < 1.2 x 10) would wait until every one of them finished.
    scheduler = make_scheduler(num_kv_blocks=200, max_num_seqs=16, waiting_served_ratio=1.2)
    runner = FakeRunner(scheduler)
    for i in range(10):
        scheduler.add_request(make_request(f"r{i}", 4, max_tokens=100))
    assert len(runner.step()[0].new_requests) == 10  # nothing ran: admitted at once
    scheduler.add_request(make_request("lone", 4))
    admitted_at = next(step for step in range(1, 101) if runner.step()[0].new_requests)
    assert admitted_at <= 21, admitted_at  # the default bound: 20 steps without an admission
    assert scheduler.num_running == 11  # ...while the ten are still decoding


def test_a_long_prompt_leaves_room_for_short_ones_beside_it() -> None:
    # A 1000-token prompt under a 64-token budget: without a per-request cap its chunks take the whole
    # budget for 16 steps and nothing else is admitted meanwhile.
    scheduler = make_scheduler(num_kv_blocks=200, max_model_len=1100)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("long", 1000))
    scheduler.add_request(make_request("short", 5))
    output, _ = runner.step()
    assert output.num_scheduled_tokens == {"long": 32, "short": 5}  # the cap: half the budget by default
    scheduler.add_request(make_request("later", 6))  # arrives while the long prompt is mid-prefill
    output, _ = runner.step()
    assert output.num_scheduled_tokens == {"long": 32, "short": 1, "later": 6}
    output, _ = runner.step()  # the decodes behind it still get their token every step
    assert output.num_scheduled_tokens == {"long": 32, "short": 1, "later": 1}


def test_long_prefill_token_threshold_sets_the_cap() -> None:
    scheduler = make_scheduler(num_kv_blocks=200, max_model_len=1100, long_prefill_token_threshold=16)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("long", 1000))
    output, _ = runner.step()
    assert output.num_scheduled_tokens == {"long": 64}  # alone it is not held back: nobody needs the rest
    scheduler.add_request(make_request("short", 40))
    output, _ = runner.step()
    # The last one scheduled in a step has nobody behind it to leave budget for.
    assert output.num_scheduled_tokens == {"long": 16, "short": 40}


# ---- lanes: interactive (lane_rank 0) above batch (lane_rank 1) -----------------------------------
def make_lane_request(req_id: str, prompt: int, lane_rank: int, max_tokens: int = 4, priority: int = 0) -> Request:
    request = make_request(req_id, prompt, max_tokens=max_tokens, priority=priority)
    request.lane_rank = lane_rank
    return request


def run_to_end(runner: FakeRunner, max_steps: int = 200) -> list[str]:
    """Step until nothing is left; the request ids in the order they finished."""
    finished: list[str] = []
    for _ in range(max_steps):
        if not runner.scheduler.has_unfinished_requests():
            return finished
        _, updated = runner.step()
        finished.extend(r.request_id for r in updated if r.is_finished)
    raise AssertionError("requests did not finish")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_interactive_runs_before_waiting_batch_in_either_policy(policy: str) -> None:
    scheduler = make_scheduler(max_num_seqs=1, scheduling_policy=policy)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_lane_request("batch-old", 3, lane_rank=1))
    scheduler.add_request(make_lane_request("inter", 3, lane_rank=0, priority=7))  # a worse priority, a better lane
    assert run_to_end(runner) == ["inter", "batch-old"]


def test_interactive_takes_the_seat_of_a_running_batch_request_which_is_recomputed() -> None:
    scheduler = make_scheduler(max_num_seqs=2, scheduling_policy="priority")
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_lane_request("b1", 5, lane_rank=1, max_tokens=6))
    scheduler.add_request(make_lane_request("b2", 5, lane_rank=1, max_tokens=6))
    runner.step()
    runner.step()  # both batch requests decode: every seat is taken
    b2 = scheduler.get_request("b2")
    assert b2 is not None and b2.num_output_tokens == 2
    scheduler.add_request(make_lane_request("i1", 4, lane_rank=0, max_tokens=2))
    assert not scheduler.can_schedule_ahead()  # the preemption needs a schedule() with nothing in flight
    output, _ = runner.step()
    assert output.preempted_req_ids == {"b2"}  # the newest of the lowest lane
    assert "i1" in output.num_scheduled_tokens and "b2" not in output.num_scheduled_tokens
    finished = run_to_end(runner)
    assert finished.index("i1") < finished.index("b2")
    assert b2.num_preemptions == 1 and b2.output_token_ids == [TOKEN] * 6  # recomputed, nothing lost


def test_interactive_preempts_batch_when_blocks_run_out() -> None:
    # 6 usable blocks of 8 tokens (one is the null block): two batch requests of 20 tokens hold 3 each.
    scheduler = make_scheduler(num_kv_blocks=7, max_num_seqs=4, max_num_batched_tokens=64)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_lane_request("b1", 20, lane_rank=1, max_tokens=3))
    scheduler.add_request(make_lane_request("b2", 20, lane_rank=1, max_tokens=3))
    runner.step()
    assert scheduler.num_free_blocks == 0 and scheduler.num_running == 2
    scheduler.add_request(make_lane_request("i1", 10, lane_rank=0, max_tokens=2))
    output, _ = runner.step()
    assert output.preempted_req_ids == {"b2"} and "i1" in output.num_scheduled_tokens
    finished = run_to_end(runner)
    assert finished.index("i1") < finished.index("b2")
    b2 = scheduler.requests.get("b2")
    assert b2 is None  # finished, after a recompute


def test_batch_never_preempts_interactive_nor_batch_a_batch_for_a_seat() -> None:
    scheduler = make_scheduler(max_num_seqs=1, scheduling_policy="priority")
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_lane_request("i1", 3, lane_rank=0, max_tokens=4))
    runner.step()
    scheduler.add_request(make_lane_request("b1", 3, lane_rank=1, priority=-100))
    output, _ = runner.step()
    assert not output.preempted_req_ids and "b1" not in output.num_scheduled_tokens
    assert run_to_end(runner) == ["i1", "b1"]
