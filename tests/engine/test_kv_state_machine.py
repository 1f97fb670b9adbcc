"""Block pool + KV cache manager + scheduler under random add / step / abort / preempt / finish sequences
(a hypothesis state machine), with the fake runner of test_scheduler checking every step's output.

After every rule: ref counts equal block-table references, the free queue holds exactly the blocks with
ref count 0, every cached hash maps back to its block, and no block is in two requests' tables unless
it is a shared (cached, full) prefix block at the same position."""

from __future__ import annotations

import collections
import contextlib
import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_pool import NULL_BLOCK_ID
from engine.errors import PromptTooLongError
from engine.request import RequestStatus
from engine.scheduler_output import SchedulerOutput
from tests.engine.test_scheduler import BLOCK_SIZE, FakeRunner, make_request, make_scheduler

# A few shared prompt heads (two full blocks each), so prefix-cache hits and shared blocks happen.
PREFIXES = [list(range(base, base + 2 * BLOCK_SIZE)) for base in (500, 600, 700)]
EOS = 2  # make_request's EOS id


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(num_kv_blocks=st.integers(8, 24), budget=st.sampled_from([8, 16, 32, 64]),
                policy=st.sampled_from(["fcfs", "priority"]), caching=st.booleans())
    def setup(self, num_kv_blocks: int, budget: int, policy: str, caching: bool) -> None:
        self.scheduler = make_scheduler(num_kv_blocks=num_kv_blocks, max_model_len=96, max_num_seqs=4,
                                        max_num_batched_tokens=budget, scheduling_policy=policy,
                                        enable_prefix_caching=caching)
        self.runner = FakeRunner(self.scheduler)
        self.ids = (f"r{i}" for i in itertools.count())

    @rule(prefix=st.sampled_from([None, 0, 1, 2]), tail=st.lists(st.integers(3, 400), max_size=30),
          max_tokens=st.integers(1, 24), priority=st.integers(0, 2))
    def add(self, prefix: int | None, tail: list[int], max_tokens: int, priority: int) -> None:
        prompt = (PREFIXES[prefix] if prefix is not None else []) + tail
        if not prompt:
            prompt = [3]
        # More KV than the whole pool: refused at the door, holding nothing.
        with contextlib.suppress(PromptTooLongError):
            self.scheduler.add_request(make_request(next(self.ids), prompt, max_tokens=max_tokens,
                                                    priority=priority))

    @rule(eos=st.booleans())
    def step(self, eos: bool) -> None:
        self.runner.step(token_id=EOS if eos else 7)

    @precondition(lambda self: self.scheduler.has_unfinished_requests())
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        req_id = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        self.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)

    @precondition(lambda self: bool(self.scheduler.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:  # a stop string matched in the frontend
        request = data.draw(st.sampled_from(self.scheduler.running))
        self.scheduler.finish_requests(request.request_id, RequestStatus.FINISHED_STOPPED)

    @precondition(lambda self: bool(self.scheduler.running))
    @rule()
    def preempt(self) -> None:
        self.scheduler._preempt(self.scheduler._pick_victim(), SchedulerOutput())

    @invariant()
    def blocks_add_up(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        kv = self.scheduler.kv_cache_manager
        pool = kv.block_pool
        tables = kv._req_to_blocks
        references = collections.Counter(block_id for blocks in tables.values() for block_id in blocks)
        for block_id in range(pool.num_blocks):
            if block_id == NULL_BLOCK_ID:
                assert block_id not in references
                continue
            assert pool.ref_count(block_id) == references[block_id], block_id
        assert set(pool._free_queue) == {b for b in range(pool.num_blocks)
                                         if b != NULL_BLOCK_ID and pool.ref_count(b) == 0}
        for block_hash, block_id in pool._hash_to_block_id.items():
            assert pool.block_hash(block_id) == block_hash
        assert sum(pool.block_hash(b) is not None for b in range(pool.num_blocks)) == pool.num_cached_blocks
        # Only running requests hold blocks (waiting ones, preempted included, hold none).
        assert set(tables) <= {r.request_id for r in self.scheduler.running}
        positions: dict[int, set[int]] = collections.defaultdict(set)
        for blocks in tables.values():
            assert len(set(blocks)) == len(blocks)
            for index, block_id in enumerate(blocks):
                positions[block_id].add(index)
        for block_id, count in references.items():
            if count > 1:  # shared: a cached full block of a common prefix, at the same position
                assert pool.block_hash(block_id) is not None, block_id
                assert len(positions[block_id]) == 1, block_id
        for request in self.scheduler.running:
            blocks = tables.get(request.request_id, [])
            assert len(blocks) * BLOCK_SIZE >= request.num_computed_tokens

    @invariant()
    def queues_add_up(self) -> None:
        if not hasattr(self, "scheduler"):
            return
        s = self.scheduler
        assert s.num_running + s.num_waiting == len(s.requests)
        assert s.num_running <= s.config.max_num_seqs
        assert all(r.status is RequestStatus.RUNNING for r in s.running)


KVCacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
test_kv_cache_state_machine = KVCacheMachine.TestCase
