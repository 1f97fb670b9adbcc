"""Scheduler: the waiting and running queues, the token budget of each step, preemption and stops.

It owns the Request objects handed to add_request; schedule() and update_from_output() bracket each
model call and exchange plain values (engine/scheduler_output.py) with the model runner."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Iterable

from engine.config import EngineConfig
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler_output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput

logger = logging.getLogger(__name__)


class WaitingQueue:
    """Requests waiting for admission, the highest lane (lowest lane_rank) first; within a lane arrival
    order (fcfs) or (priority, arrival) order (priority).

    Removal (an abort) is lazy, so aborting many waiting requests stays linear: a removed entry is
    skipped when it reaches the head."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._fifos: dict[int, deque[Request]] = {}  # fcfs: one per lane rank
        self._heap: list[tuple[int, int, float, int, Request]] = []
        self._live: dict[str, Request] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request: Request) -> bool:
        return self._live.get(request.request_id) is request

    def push(self, request: Request, front: bool = False) -> None:
        """Enqueue; `front` (a preempted request under fcfs) puts it ahead of its lane."""
        self._live[request.request_id] = request
        if self.policy == "priority":
            entry = (request.lane_rank, request.priority, request.arrival_time, next(self._counter), request)
            heapq.heappush(self._heap, entry)
            return
        fifo = self._fifos.get(request.lane_rank)
        if fifo is None:
            fifo = self._fifos[request.lane_rank] = deque()
            self._fifos = dict(sorted(self._fifos.items()))  # lanes in rank order; a new lane is rare
        if front:
            fifo.appendleft(request)
        else:
            fifo.append(request)

    def peek(self) -> Request | None:
        if self.policy == "priority":
            while self._heap and self._heap[0][4] not in self:
                heapq.heappop(self._heap)
            return self._heap[0][4] if self._heap else None
        for fifo in self._fifos.values():
            while fifo and fifo[0] not in self:
                fifo.popleft()
            if fifo:
                return fifo[0]
        return None

    def pop(self) -> Request:
        request = self.peek()
        assert request is not None, "pop from an empty waiting queue"
        if self.policy == "priority":
            heapq.heappop(self._heap)
        else:
            self._fifos[request.lane_rank].popleft()
        del self._live[request.request_id]
        return request

    def remove(self, request: Request) -> None:
        del self._live[request.request_id]


class Scheduler:
    """Continuous batching over a token budget, vLLM-v1 style: num_computed_tokens catches up with
    num_tokens for every request, so chunked prefill, prefix hits and mixed batches need no phases.

    Admission. By default waiting prompts are admitted whenever budget, sequence slots and KV blocks
    allow: the best time to first token, but each admitted prefill (or chunk) makes that step slower
    for every running decode. With config.waiting_served_ratio set (TGI's policy) prompts are admitted
    only when nothing runs, when num_waiting >= ratio * num_running, or when config.max_waiting_steps
    (20 by default, TGI's max_waiting_tokens) steps passed since the last admission: prefills arrive in
    fewer, larger groups, so decodes run smoother and batches grow fuller, at the price of a longer TTFT
    for a prompt that arrives alone.

    Long prompts. While others share the step (running after it, or waiting), one request's prefill
    chunk is at most long_prefill_token_threshold tokens, so a 32k-token prompt neither keeps short
    prompts out nor takes the decodes' tokens; the last request of a step takes what is left.
    """

    def __init__(self, config: EngineConfig, num_kv_blocks: int, max_model_len: int) -> None:
        self.config = config
        self.block_size = config.block_size
        self.kv_cache_manager = KVCacheManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.max_model_len = max_model_len
        # A request can never outgrow the whole cache: stop it there ("length") instead of preempting
        # it forever.
        num_kv_tokens = self.kv_cache_manager.num_total_blocks * self.block_size
        self.max_seq_len = min(max_model_len, num_kv_tokens)
        if num_kv_tokens < max_model_len:
            logger.warning("kv_tokens=%d < max_model_len=%d: sequences stop at %d tokens; give the KV "
                           "cache more blocks to reach max_model_len", num_kv_tokens, max_model_len,
                           num_kv_tokens)
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self.waiting = WaitingQueue(config.scheduling_policy)
        self.running: list[Request] = []  # admission order: the batch order of their decodes
        self._finished_req_ids: set[str] = set()  # since the last schedule(), for the runner
        self._num_preemptions = 0
        self._num_steps_since_admission = 0
        self._ahead_blocked = False  # schedule_ahead() ran out of blocks: the next step must preempt
        self.long_prefill_token_threshold = (config.long_prefill_token_threshold
                                             or max(1, config.max_num_batched_tokens // 2))

    # ---- requests in and out ------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in the engine; "
                                      f"give each request a unique id")
        num_tokens = request.num_tokens
        if num_tokens + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"request {request.request_id!r}: the prompt has {num_tokens} tokens (including resumed "
                f"outputs) and max_model_len is {self.max_model_len}, leaving no room to generate; "
                f"shorten the prompt to at most {self.max_model_len - 1} tokens or raise max_model_len")
        num_blocks_needed = -(-(num_tokens + 1) // self.block_size)
        num_total_blocks = self.kv_cache_manager.num_total_blocks
        if num_blocks_needed > num_total_blocks:
            raise PromptTooLongError(
                f"request {request.request_id!r}: {num_tokens} tokens plus one generated need "
                f"{num_blocks_needed} KV blocks of {self.block_size} tokens but the cache has only "
                f"{num_total_blocks}; shorten the prompt to at most {self.max_seq_len - 1} tokens or give "
                f"the KV cache more memory (num_kv_blocks / gpu_memory_utilization / cpu_kv_cache_gb)")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Abort or stop (stop strings) waiting or running requests; unknown ids are ignored."""
        assert status.is_finished, f"{status} is not a finished status"
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        finished: list[Request] = []
        for req_id in request_ids:
            request = self.requests.pop(req_id, None)
            if request is None:
                continue
            if request in self.waiting:
                self.waiting.remove(request)
            request.status = status
            self.kv_cache_manager.free(request)
            self._finished_req_ids.add(req_id)
            finished.append(request)
        if finished:
            self.running = [request for request in self.running if not request.is_finished]
        return finished

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step, with no step in flight (async scheduling: see schedule_ahead)."""
        output = SchedulerOutput()
        self._ahead_blocked = False
        budget = self._schedule_running(output, self.config.max_num_batched_tokens, is_ahead=False)
        # No admission in a step that preempted: the freed blocks would only be fought over again.
        if not output.preempted_req_ids and self._admission_allowed():
            self._schedule_waiting(output, budget)
        self._num_steps_since_admission = 0 if output.new_requests else self._num_steps_since_admission + 1
        return self._finish_output(output)

    def schedule_ahead(self) -> SchedulerOutput | None:
        """Schedule the running requests' next step while the previous one is still in flight.

        A request whose in-flight step samples a token gets one decode token whose id only the
        device knows yet (the runner feeds it from the sampled ids); one in a prefill chunk gets its
        next chunk. A request whose in-flight token will be its last (max_tokens, max_model_len) is
        left out; one that stops on EOS or a stop string there runs one wasted row, dropped in
        update_from_output. Never admits or preempts: when blocks run out it stops, and the next step
        is scheduled with nothing in flight. Returns None when nothing was scheduled (the
        finished-request ids then stay for the next schedule)."""
        output = SchedulerOutput()
        self._schedule_running(output, self.config.max_num_batched_tokens, is_ahead=True)
        if not output.num_scheduled_tokens:
            return None
        self._num_steps_since_admission += 1
        return self._finish_output(output)

    def _finish_output(self, output: SchedulerOutput) -> SchedulerOutput:
        output.total_num_scheduled_tokens = sum(output.num_scheduled_tokens.values())
        output.finished_req_ids = self._finished_req_ids
        self._finished_req_ids = set()
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int, *, is_ahead: bool) -> int:
        """Running requests in order: a decode token or the next prefill chunk each. Returns the budget left.

        is_ahead (schedule_ahead): a step is in flight, and its tokens count as computed. Otherwise,
        when blocks run out, victims are preempted until the request fits; it stops once it is the victim."""
        num_scheduled_tokens = output.num_scheduled_tokens
        cached_requests = output.cached_requests  # in running order, as scheduled
        running = self.running
        num_running = len(running)
        for index, request in enumerate(list(running)):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_inflight = request.num_inflight_tokens  # 0 unless is_ahead
            num_computed_tokens = request.num_computed_tokens + num_inflight
            num_tokens = request.num_tokens
            num_new_tokens = num_tokens - num_computed_tokens
            if num_new_tokens > 1:  # a prefill chunk
                num_new_tokens = min(num_new_tokens, budget)
                if index < num_running - 1 or self.waiting:
                    # Others come after it in this step: cap a long prompt's chunk so they get theirs.
                    num_new_tokens = min(num_new_tokens, self.long_prefill_token_threshold)
            elif num_new_tokens < 1:  # only ahead: the in-flight step samples this request's next token
                assert is_ahead, f"{request.request_id}: the runner sampled no token for a finished prefill"
                if (request.num_output_tokens + 1 >= request.sampling_params.max_tokens
                        or num_tokens + 1 >= self.max_seq_len):
                    continue  # that token is its last
                num_new_tokens = 1
            block_ids = self._allocate(request, num_computed_tokens, num_new_tokens)
            while block_ids is None and not is_ahead:
                victim = self._pick_victim()
                self._preempt(victim, output)
                if victim.request_id in num_scheduled_tokens:  # priority policy: undo its step
                    budget += num_scheduled_tokens.pop(victim.request_id)
                    output.cached_requests = cached_requests = [
                        c for c in cached_requests if c.req_id != victim.request_id]
                if victim is request:
                    break
                block_ids = self._allocate(request, num_computed_tokens, num_new_tokens)
            if block_ids is None:
                self._ahead_blocked = is_ahead
                break
            num_scheduled_tokens[request.request_id] = num_new_tokens
            cached_requests.append(CachedRequestData(
                req_id=request.request_id, new_block_ids=block_ids, num_computed_tokens=num_computed_tokens))
            request.num_inflight_tokens = num_inflight + num_new_tokens
            budget -= num_new_tokens
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        """Admit waiting (new or preempted) requests in queue order while budget, seats and blocks last.

        A head of a higher lane takes the seat (or the blocks) of a running request of a lower lane:
        interactive work preempts batch work, which is recomputed when it gets back in."""
        kv = self.kv_cache_manager
        while budget > 0:
            request = self.waiting.peek()
            if request is None:
                break
            if len(self.running) >= self.config.max_num_seqs:
                freed = self._preempt_lower_lane(request, output)
                if freed is None:
                    break
                budget += freed
                continue
            assert request.num_computed_tokens == 0, "waiting requests hold no KV"
            computed_block_ids, num_hit_tokens = kv.get_computed_blocks(request)
            # Others waiting behind it: cap a long prompt's chunk so they get in beside it.
            cap = budget if len(self.waiting) == 1 else self.long_prefill_token_threshold
            num_new_tokens = min(request.num_tokens - num_hit_tokens, budget, cap)
            if kv.allocate_slots(request, num_new_tokens, computed_block_ids) is None:
                freed = self._preempt_lower_lane(request, output)
                if freed is None:
                    break  # the head does not fit: admitting those behind it would starve it
                budget += freed
                continue
            self.waiting.pop()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.new_requests.append(NewRequestData(
                req_id=request.request_id, token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens, block_ids=kv.get_block_ids(request.request_id),
                num_computed_tokens=num_hit_tokens, sampling_params=request.sampling_params,
                seed=request.seed))
            output.num_scheduled_tokens[request.request_id] = num_new_tokens
            request.num_inflight_tokens = num_new_tokens
            budget -= num_new_tokens

    # ---- async scheduling: the next step, scheduled while this one runs -----------------------

    def can_schedule_ahead(self) -> bool:
        """Whether schedule_ahead() may run now, one step being in flight.

        Not when a waiting request could be admitted (admission, like preemption, happens in a
        schedule() with nothing in flight, so a request never joins or leaves the batch under a step
        that still carries its old state), nor after schedule_ahead() ran out of blocks, nor when a
        running request uses penalties (the sampler would count the in-flight token on the host). A
        grammar's bitmask depends on that token too, but the runner samples such a step once the token
        arrives (its forward already running): that needs the one-GPU runner."""
        if self._ahead_blocked:
            return False
        head = self.waiting.peek()
        if head is not None and self._admission_allowed() and self._outranked(head) is not None:
            return False  # it takes a lower lane's seat: a preemption, which needs schedule()
        if (head is not None and len(self.running) < self.config.max_num_seqs and self._admission_allowed()
                and self.kv_cache_manager.num_free_blocks * self.block_size > head.num_tokens):
            return False  # (a head that cannot get its blocks waits either way: no reason to stop)
        grammar_ahead = self.config.tensor_parallel_size == 1
        return not any(request.sampling_params.has_penalties
                       or (request.sampling_params.structured_output is not None and not grammar_ahead)
                       for request in self.running)

    def _allocate(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> list[int] | None:
        """New blocks for num_new_tokens after num_computed_tokens (computed or in flight); None when the
        pool is short.

        A running request holds exactly the blocks of its scheduled tokens (test_scheduler's FakeRunner
        asserts it every step): tokens that still fit its last block need no new one, and no call."""
        num_last_block_tokens = num_computed_tokens % self.block_size
        if num_last_block_tokens and num_last_block_tokens + num_new_tokens <= self.block_size:
            return []
        # allocate_slots counts from request.num_computed_tokens: in-flight tokens come first.
        return self.kv_cache_manager.allocate_slots(
            request, num_computed_tokens - request.num_computed_tokens + num_new_tokens)

    def _admission_allowed(self) -> bool:
        ratio = self.config.waiting_served_ratio
        if ratio is None or not self.running:
            return True
        if len(self.waiting) >= ratio * len(self.running):
            return True
        max_waiting_steps = self.config.max_waiting_steps
        return max_waiting_steps is not None and self._num_steps_since_admission >= max_waiting_steps

    def _pick_victim(self) -> Request:
        """The lowest lane first; within it the lowest priority (largest value, policy priority) and
        the newest among equals. The list is in admission order and max() keeps the first maximum of
        the reversed list, so the last of equals wins the tie on arrival_time too."""
        if self.config.scheduling_policy == "priority":
            return max(reversed(self.running), key=lambda r: (r.lane_rank, r.priority, r.arrival_time))
        return max(reversed(self.running), key=lambda r: r.lane_rank)

    def _outranked(self, request: Request) -> Request | None:
        """The running request `request` may preempt (the victim, of a lower lane), or None."""
        if not self.running:
            return None
        victim = self._pick_victim()
        return victim if victim.lane_rank > request.lane_rank else None

    def _preempt_lower_lane(self, request: Request, output: SchedulerOutput) -> int | None:
        """Preempt one running request of a lower lane than `request` (waiting) and undo its part of
        this step; returns the token budget that gave back, or None when none ranks lower."""
        victim = self._outranked(request)
        if victim is None:
            return None
        self._preempt(victim, output)
        output.cached_requests = [c for c in output.cached_requests if c.req_id != victim.request_id]
        output.new_requests = [n for n in output.new_requests if n.req_id != victim.request_id]
        return output.num_scheduled_tokens.pop(victim.request_id, 0)

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        """Recompute-style preemption: drop the KV, send the request back to the waiting queue."""
        if self.running and self.running[-1] is request:
            self.running.pop()
        else:
            self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_inflight_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.push(request, front=True)
        output.preempted_req_ids.add(request.request_id)
        self._finished_req_ids.add(request.request_id)
        logger.info("job=%s preempted tokens=%d free_blocks=%d", request.request_id, request.num_tokens,
                    self.kv_cache_manager.num_free_blocks)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[Request]:
        """Advance progress, cache newly full blocks, append sampled tokens and apply the stops.

        Returns the requests that got a token this step, finished or not, in batch order."""
        kv = self.kv_cache_manager
        block_size = self.block_size
        requests = self.requests
        sampled_token_ids = runner_output.sampled_token_ids
        running = RequestStatus.RUNNING
        updated: list[Request] = []
        num_finished = 0
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = requests.get(req_id)
            if request is None or request.status is not running:
                continue  # aborted (or preempted) after this step was scheduled
            num_computed_before = request.num_computed_tokens
            num_computed_tokens = request.num_computed_tokens = num_computed_before + num_tokens
            request.num_inflight_tokens -= num_tokens
            # Every block below num_computed_before // block_size is registered already (admission
            # registers a prefix hit, each update what it filled): only a crossed boundary adds one.
            if num_computed_tokens // block_size != num_computed_before // block_size:
                kv.cache_full_blocks(request, num_computed_tokens)
            token_id = sampled_token_ids.get(req_id)
            if token_id is None:
                continue  # a partial prefill chunk
            request.append_output_token(token_id)
            status = self._check_stop(request, token_id)
            if status is not None:
                request.status = status
                kv.free(request)
                del requests[req_id]
                self._finished_req_ids.add(req_id)
                num_finished += 1
            updated.append(request)
        if num_finished:
            self.running = [request for request in self.running if not request.is_finished]
        return updated

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if params.stop_token_ids and token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_seq_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- state for the engine and its stats ---------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def kv_waste(self) -> float:
        return self.kv_cache_manager.kv_waste()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    @property
    def kv_usage(self) -> float:
        return self.kv_cache_manager.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.kv_cache_manager.prefix_cache_hit_rate

    @property
    def num_free_blocks(self) -> int:
        return self.kv_cache_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.kv_cache_manager.num_total_blocks
