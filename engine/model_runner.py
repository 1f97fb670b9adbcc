"""ModelRunner: the only owner of tensors and the device. It loads the model, sizes and allocates the
paged KV cache, and turns each SchedulerOutput into one forward pass plus sampling.

It keeps a per-request state (token ids, block table, sampling params) keyed by req_id, fed by
NewRequestData / CachedRequestData and by the tokens it samples itself."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.attention import AttentionMetadata, bind_kv_cache, release_kv_cache
from engine.config import EngineConfig
from engine.cuda_graphs import PADDING_ROW, PENDING_TOKEN, DecodeGraphs, fill_pending_tokens
from engine.distributed import TPInfo, broadcast_from_driver, rank_device
from engine.errors import UnsupportedModelError
from engine.loader import load_model, resolve_dtype
from engine.model_files import ModelFiles
from engine.sampler import SampleLogprobs, Sampler, SamplingMetadata, takes_model_dtype
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.structured_output import RequestGrammar, StructuredOutputManager
from kernels.reference import FP8_DTYPE

logger = logging.getLogger(__name__)


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt then outputs, including the ones this runner sampled
    num_prompt_tokens: int
    sampling_params: SamplingParams
    seed: int
    num_computed_tokens: int
    table_row: int = PADDING_ROW  # this request's row of the runner's device block table
    # Tokens sampled by launched steps but not yet on the host (async scheduling): the newest one is
    # in the runner's token_buffer at table_row, and a step launched now reads it from there.
    num_pending: int = 0
    # Block table as an int32 CPU tensor grown in place, so a step stacks rows without a per-block loop.
    block_table: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    num_blocks: int = 0
    grammar: RequestGrammar | None = None  # structured output: the matcher, at this state's tokens

    @property
    def num_tokens(self) -> int:
        """Tokens known to this runner: on the host, plus the pending ones still on the device."""
        return len(self.token_ids) + self.num_pending

    def append_block_ids(self, block_ids: list[int]) -> None:
        if not block_ids:
            return
        needed = self.num_blocks + len(block_ids)
        if needed > self.block_table.numel():
            grown = torch.empty(max(needed, 2 * self.block_table.numel()), dtype=torch.int32)
            grown[:self.num_blocks] = self.block_table[:self.num_blocks]
            self.block_table = grown
        self.block_table[self.num_blocks:needed] = torch.tensor(block_ids, dtype=torch.int32)
        self.num_blocks = needed


class ModelRunner:
    def __init__(self, config: EngineConfig, files: ModelFiles, hf_config: Any, max_model_len: int,
                 structured_output: StructuredOutputManager | None = None, tp: TPInfo | None = None) -> None:
        self.config = config
        self.structured_output = structured_output  # None: requests with a grammar cannot run here
        # Tensor parallelism: this runner computes its rank's shard of every step; rank 0 (the driver)
        # samples and the others take its tokens (broadcast on the device). The process group must
        # exist already (engine/executor.py).
        self.tp = tp or TPInfo()
        self.device = rank_device(config.device, self.tp.rank)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_cache_dtype = FP8_DTYPE if config.kv_cache_dtype == "fp8" else self.dtype
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        # Seconds of each start-up phase this runner owns (bench/startup.py reads the log lines).
        self.startup_s: dict[str, float] = {}
        started = time.perf_counter()
        self.model = load_model(files, hf_config, self.dtype, self.device, self.tp, config.load_format)
        self._record_startup("model_load", started)
        model_cfg = self.model.config
        if model_cfg.sliding_window is not None and max_model_len > model_cfg.sliding_window:
            raise UnsupportedModelError(
                f"this checkpoint uses sliding-window attention ({model_cfg.sliding_window} tokens), which we "
                f"do not implement; set max_model_len <= {model_cfg.sliding_window}")
        self.vocab_size: int = model_cfg.vocab_size
        self.num_layers: int = model_cfg.num_layers
        self.num_kv_heads: int = model_cfg.num_local_kv_heads  # this rank's (all of them at TP=1)
        self.head_dim: int = model_cfg.head_dim
        self.sampler = Sampler()
        self._deferred: StepHandle | None = None  # a step launched ahead whose sampling waits (grammars)
        # The last token sampled for each block-table row, on the device: a step launched before the
        # previous step's tokens reach the host (async scheduling) takes its inputs from here.
        self.token_buffer = torch.zeros(config.max_num_seqs + 1, dtype=torch.int64, device=self.device)
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None  # fp8 caches: [layers, 2, blocks, H_kv, block_size] fp32
        self.decode_graphs: DecodeGraphs | None = None
        # Device mirror of every live request's block table (one row each), for the decode graphs;
        # updated incrementally with the block ids each step appends. Row PADDING_ROW is never used.
        self.block_table_device: torch.Tensor | None = None
        self._free_table_rows = list(range(config.max_num_seqs, PADDING_ROW, -1))
        self._pending_table_writes: list[tuple[int, int, list[int]]] = []  # (row, first column, ids)

    def _record_startup(self, phase: str, started: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.startup_s[phase] = time.perf_counter() - started
        logger.info("startup phase=%s s=%.3f", phase, self.startup_s[phase])

    @property
    def is_fp8_kv_cache(self) -> bool:
        return self.kv_cache_dtype == FP8_DTYPE

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one block across all layers (K and V; an fp8 cache's 1-byte values plus their fp32
        scales, one per token and KV head)."""
        rows = 2 * self.num_layers * self.num_kv_heads * self.block_size  # (token, head) rows of K and V
        element_size = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        scale_bytes = 4 if self.is_fp8_kv_cache else 0
        return rows * (self.head_dim * element_size + scale_bytes)

    def num_kv_blocks_from_memory(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cpu":
            num_blocks = int(self.config.cpu_kv_cache_gb * (1 << 30)) // self.kv_block_bytes
        else:
            started = time.perf_counter()
            num_blocks = self._profile_gpu_num_blocks()
            self._record_startup("kv_profile", started)
        if num_blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache (one block needs {self.kv_block_bytes} bytes); raise "
                f"cpu_kv_cache_gb / gpu_memory_utilization, lower max_num_batched_tokens, or set num_kv_blocks")
        return num_blocks

    def _profile_gpu_num_blocks(self) -> int:
        """Give the KV cache what the profile run's peak (weights + activations) leaves of the budget."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        temp_cache_bytes = self.profile_run()
        torch.cuda.synchronize(self.device)
        activation_bytes = torch.cuda.max_memory_allocated(self.device) - temp_cache_bytes
        free_bytes, total_bytes = torch.cuda.mem_get_info(self.device)
        non_torch_bytes = max(0, (total_bytes - free_bytes) - torch.cuda.memory_reserved(self.device))
        torch.cuda.empty_cache()
        available = self.config.gpu_memory_utilization * total_bytes - activation_bytes - non_torch_bytes
        logger.info("kv profile: weights_and_activations_gb=%.2f non_torch_gb=%.2f kv_gb=%.2f",
                    activation_bytes / 2**30, non_torch_bytes / 2**30, max(0.0, available) / 2**30)
        return max(0, int(available) // self.kv_block_bytes)

    def profile_run(self) -> int:
        """The worst step for memory: one forward of max_num_batched_tokens tokens over a temporary
        cache, then the sampler on max_num_seqs rows (its [N, vocab] temporaries). Leaves no state
        behind; returns the temporary cache's bytes (part of the peak, not of the activations)."""
        num_tokens = self.config.max_num_batched_tokens
        num_seqs = min(self.config.max_num_seqs, max(1, -(-num_tokens // self.max_model_len)))
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        num_temp_blocks = sum(-(-n // self.block_size) for n in lens)
        self.allocate_kv_cache(num_temp_blocks)
        next_block = iter(range(num_temp_blocks))
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.1)
        for i, n in enumerate(lens):
            state = CachedRequestState(f"profile-{i}", [0] * n, n, params, seed=0, num_computed_tokens=0)
            state.append_block_ids([next(next_block) for _ in range(-(-n // self.block_size))])
            self.requests[state.req_id] = state
        self.execute_model(SchedulerOutput(
            num_scheduled_tokens={f"profile-{i}": n for i, n in enumerate(lens)},
            total_num_scheduled_tokens=num_tokens))
        num_rows = self.config.max_num_seqs
        with torch.inference_mode():
            logits = torch.zeros((num_rows, self.vocab_size), dtype=torch.float32, device=self.device)
            metadata = SamplingMetadata.from_params([params] * num_rows, [0] * num_rows, [1] * num_rows,
                                                    [[0, 0]] * num_rows, [1] * num_rows, self.vocab_size,
                                                    self.device)
            self.sampler(logits, metadata)
        self.requests.clear()
        release_kv_cache(self.model)
        self.kv_cache = self.kv_scales = None
        return num_temp_blocks * self.kv_block_bytes

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # One tensor for all layers; each Attention layer gets views [num_blocks, H_kv, block_size, D].
        shape = (self.num_layers, 2, num_blocks, self.num_kv_heads, self.block_size)
        self.kv_cache = torch.zeros((*shape, self.head_dim), dtype=self.kv_cache_dtype, device=self.device)
        # fp8: one fp32 scale per (token, KV head) row, written with the row.
        self.kv_scales = (torch.zeros(shape, dtype=torch.float32, device=self.device)
                          if self.is_fp8_kv_cache else None)
        bind_kv_cache(self.model, self.kv_cache, self.kv_scales)

    def capture_cudagraphs(self) -> None:
        """Capture the decode forward for every padded batch size (CUDA only, after allocate_kv_cache)."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        started = time.perf_counter()
        max_blocks = -(-self.max_model_len // self.block_size)
        self.block_table_device = torch.zeros((self.config.max_num_seqs + 1, max_blocks), dtype=torch.int32,
                                              device=self.device)
        graphs = DecodeGraphs(self.model, self.block_table_device, self.token_buffer,
                              max_num_seqs=self.config.max_num_seqs,
                              max_model_len=self.max_model_len, block_size=self.block_size)
        graphs.capture()
        self.decode_graphs = graphs
        self._record_startup("graph_capture", started)

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            state = self.requests.pop(req_id, None)
            if state is not None:
                self._free_table_rows.append(state.table_row)
        for new in so.new_requests:
            state = CachedRequestState(new.req_id, list(new.token_ids), new.num_prompt_tokens,
                                       new.sampling_params, new.seed, new.num_computed_tokens,
                                       table_row=self._free_table_rows.pop())
            self.requests[new.req_id] = state
            self._append_blocks(state, new.block_ids)
            grammar_params = new.sampling_params.structured_output
            if grammar_params is not None and self.tp.is_driver:  # only the driver samples
                assert self.structured_output is not None, "a request with a grammar needs a StructuredOutputManager"
                state.grammar = self.structured_output.new_request_grammar(
                    new.req_id, grammar_params, new.token_ids[new.num_prompt_tokens:])
        for cached in so.cached_requests:
            state = self.requests[cached.req_id]
            self._append_blocks(state, cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
        self._flush_table_writes()

    def _append_blocks(self, state: CachedRequestState, block_ids: list[int]) -> None:
        if block_ids and self.block_table_device is not None:
            self._pending_table_writes.append((state.table_row, state.num_blocks, block_ids))
        state.append_block_ids(block_ids)

    def _flush_table_writes(self) -> None:
        """Apply the step's new block ids to the device block table in one scatter."""
        if not self._pending_table_writes or self.block_table_device is None:
            return
        rows = [row for row, _, ids in self._pending_table_writes for _ in ids]
        cols = [col + i for _, col, ids in self._pending_table_writes for i in range(len(ids))]
        vals = [b for _, _, ids in self._pending_table_writes for b in ids]
        self._pending_table_writes.clear()
        index = torch.tensor([rows, cols, vals], dtype=torch.int64).to(self.device, non_blocking=True)
        self.block_table_device[index[0], index[1]] = index[2].to(torch.int32)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One step, waiting for its tokens."""
        return self.wait(self.launch(scheduler_output))

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Queue one step's forward and sampling on the device; wait() brings its tokens to the host.

        Steps may be launched before the previous one's tokens reached the host: a request whose last
        token is still pending reads it from token_buffer on the device."""
        assert self.kv_cache is not None, "allocate_kv_cache must run before launch"
        self._update_states(scheduler_output)
        if scheduler_output.is_empty:
            return StepHandle()
        states = [self.requests[req_id] for req_id in scheduler_output.num_scheduled_tokens]
        num_scheduled = list(scheduler_output.num_scheduled_tokens.values())
        num_computed = [s.num_computed_tokens for s in states]
        graphs = self.decode_graphs
        if (graphs is not None and graphs.can_run(len(states))
                and all(c + 1 == s.num_tokens for s, c in zip(states, num_computed, strict=True))
                and all(n == 1 for n in num_scheduled)):
            # Pure decode: every request computes its last token and samples the next one.
            hidden = graphs.run([PENDING_TOKEN if s.num_pending else s.token_ids[-1] for s in states], num_computed,
                                [s.table_row for s in states])
            sampled, logits_indices = states, None
            sampled_rows = graphs.table_rows(len(states))
        else:
            step = self._prepare_inputs(states, num_scheduled, num_computed)
            input_ids, positions, attn_metadata, logits_indices, sampled_rows = step.to_device(
                self.device, self.token_buffer)
            hidden = self.model(input_ids, positions, attn_metadata)  # [T, hidden]
            sampled = step.sampled
        if not sampled:
            return StepHandle()
        rows = hidden if logits_indices is None else hidden[logits_indices]
        if self.tp.size > 1 and not self.tp.is_driver:
            return self._take_driver_tokens(sampled, sampled_rows, rows)
        metadata = SamplingMetadata.from_params(
            [s.sampling_params for s in sampled], [s.seed for s in sampled],
            [s.num_tokens for s in sampled],
            [s.token_ids for s in sampled], [s.num_prompt_tokens for s in sampled], self.vocab_size, self.device)
        logits = self.model.compute_logits(rows)  # [N, vocab] in the model's dtype
        has_grammar = any(s.grammar is not None for s in sampled)
        if not takes_model_dtype(metadata, self.device, constrained=has_grammar):
            # Plain greedy (and the fused sampling kernel, which upcasts in registers) reads the model's
            # own logits: the fp32 upcast is exact, so it would pick the same token, after a [N, vocab]
            # copy (~0.2 ms a step at 256 x 151,936).
            logits = logits.float()
        assert metadata.output_token_ids is None or not any(s.num_pending for s in sampled), \
            "penalties read the output tokens on the host: schedule such a step with nothing in flight"
        if has_grammar and any(s.grammar is not None and s.num_pending for s in sampled):
            # Launched ahead (async scheduling): a grammar's bitmask needs the token still in flight.
            # The forward and the logits are queued now; the sampler follows once the step before this
            # one reaches the host (wait()), while the GPU runs this step's forward.
            assert self.tp.size == 1 and self._deferred is None, "one deferred step, on one GPU"
            for state in sampled:
                state.num_pending += 1
            handle = StepHandle(sampled, deferred=(logits, metadata, sampled_rows))
            self._deferred = handle
            return handle
        self._add_token_bitmask(sampled, metadata)
        return self._sample(sampled, sampled_rows, logits, metadata)

    def _sample(self, sampled: list[CachedRequestState], sampled_rows: torch.Tensor, logits: torch.Tensor,
                metadata: SamplingMetadata, handle: StepHandle | None = None) -> StepHandle:
        token_ids, logprobs = self.sampler(logits, metadata)
        if self.tp.size > 1:
            broadcast_from_driver(token_ids)
        return self._record_sampled(sampled, sampled_rows, token_ids, logprobs, handle)

    @torch.inference_mode()  # it runs from wait(): the logits are inference tensors
    def _finish_deferred(self) -> None:
        """Sample the step launched ahead, now that every grammar has its previous token."""
        handle, self._deferred = self._deferred, None
        assert handle is not None and handle.deferred is not None
        logits, metadata, sampled_rows = handle.deferred
        handle.deferred = None
        self._add_token_bitmask(handle.sampled, metadata, own_pending=1)
        self._sample(handle.sampled, sampled_rows, logits, metadata, handle)

    def _take_driver_tokens(self, sampled: list[CachedRequestState], sampled_rows: torch.Tensor,
                            rows: torch.Tensor) -> StepHandle:
        """A rank other than the driver: its part of the logits' all-gather, then the driver's tokens."""
        self.model.compute_logits(rows)
        token_ids = torch.empty(len(sampled), dtype=torch.int64, device=self.device)
        return self._record_sampled(sampled, sampled_rows, broadcast_from_driver(token_ids), None)

    def _record_sampled(self, sampled: list[CachedRequestState], sampled_rows: torch.Tensor,
                        token_ids: torch.Tensor, logprobs: SampleLogprobs | None,
                        handle: StepHandle | None = None) -> StepHandle:
        """The sampled tokens into token_buffer (the next step launched may read them there) and on
        their way to the host; into `handle` when it is a deferred step's (its tokens were already
        counted pending at launch)."""
        self.token_buffer.index_copy_(0, sampled_rows, token_ids)
        if handle is None:
            for state in sampled:
                state.num_pending += 1
            handle = StepHandle(sampled)
        handle.logprobs = logprobs
        if self.device.type == "cuda":
            handle.token_ids = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            handle.token_ids.copy_(token_ids, non_blocking=True)
            handle.event = torch.cuda.Event()
            handle.event.record()
        else:
            handle.token_ids = token_ids
        return handle

    def wait(self, handle: StepHandle) -> ModelRunnerOutput:
        """Block until a launched step's tokens are on the host (the step's one sync) and record them."""
        output = ModelRunnerOutput()
        if handle.deferred is not None:  # nothing else in flight: its grammars are up to date
            self._finish_deferred()
        if handle.token_ids is None:
            return output
        if handle.event is not None:
            handle.event.synchronize()
        token_id_list: list[int] = handle.token_ids.tolist()
        for state, token_id in zip(handle.sampled, token_id_list, strict=True):
            state.token_ids.append(token_id)
            state.num_pending -= 1
            output.sampled_token_ids[state.req_id] = token_id
            if state.grammar is not None:
                state.grammar.accept(token_id)
        if handle.logprobs is not None:
            output.logprobs = _logprobs_to_dicts(handle.sampled, token_id_list, handle.logprobs)
        if self._deferred is not None:
            # The step launched after this one waits for these tokens' grammar updates: sample it now,
            # while the GPU runs its forward.
            self._finish_deferred()
        return output

    def _add_token_bitmask(self, sampled: list[CachedRequestState], metadata: SamplingMetadata,
                           own_pending: int = 0) -> None:
        """Fill the grammar bitmask of the step's constrained rows (on the host, from each matcher) and
        send it with the step; unconstrained rows of the batch are left alone. own_pending: tokens of
        this very step already counted pending (a deferred step's)."""
        rows = [i for i, s in enumerate(sampled) if s.grammar is not None]
        if not rows:
            return
        assert all(sampled[i].num_pending == own_pending for i in rows), \
            "a grammar's bitmask follows the tokens on the host: an earlier step's token is still in flight"
        assert self.structured_output is not None
        bitmask = self.structured_output.fill_bitmask([g for i in rows if (g := sampled[i].grammar) is not None],
                                                      pin_memory=self.device.type == "cuda")
        metadata.token_bitmask = bitmask.to(self.device, non_blocking=True)
        if len(rows) < len(sampled):
            metadata.bitmask_rows = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=True)

    def _prepare_inputs(self, states: list[CachedRequestState], num_scheduled: list[int],
                        num_computed: list[int]) -> StepInputs:
        """Flatten the step's tokens (batch order = scheduler order) and build the paged-attention
        metadata with torch ops on the CPU; the caller moves them to the device (or a CUDA graph)."""
        if all(n == 1 for n in num_scheduled):
            return self._prepare_decode(states, num_computed)
        num_tokens = sum(num_scheduled)
        # A pending token (async scheduling) is the last of its request's chunk: PENDING_TOKEN here,
        # filled on the device from token_buffer.
        input_ids = torch.tensor(list(itertools.chain.from_iterable(
            s.token_ids[c:c + n] + [PENDING_TOKEN] * (c + n - len(s.token_ids))
            for s, c, n in zip(states, num_computed, num_scheduled, strict=True))), dtype=torch.int64)
        num_scheduled_t = torch.tensor(num_scheduled, dtype=torch.int64)
        num_computed_t = torch.tensor(num_computed, dtype=torch.int64)
        query_start_loc = torch.zeros(len(states) + 1, dtype=torch.int64)
        torch.cumsum(num_scheduled_t, dim=0, out=query_start_loc[1:])
        req_indices = torch.repeat_interleave(torch.arange(len(states)), num_scheduled_t, output_size=num_tokens)
        positions = (torch.arange(num_tokens) - query_start_loc[req_indices]) + num_computed_t[req_indices]
        block_tables = torch.nn.utils.rnn.pad_sequence(
            [s.block_table[:s.num_blocks] for s in states], batch_first=True)  # [B, max_blocks] int32
        slot_mapping = (block_tables[req_indices, positions // self.block_size].long() * self.block_size
                        + positions % self.block_size)
        seq_lens = num_computed_t + num_scheduled_t
        # Only rows that reach the end of the request's known tokens produce a token; a partial
        # prefill chunk samples nothing.
        is_sampled = [c + n == s.num_tokens for s, c, n in zip(states, num_computed, num_scheduled, strict=True)]
        logits_indices = query_start_loc[1:][torch.tensor(is_sampled, dtype=torch.bool)] - 1
        token_rows = None
        if any(s.num_pending for s in states):
            token_rows = torch.tensor([s.table_row for s in states], dtype=torch.int64)[req_indices]
        # The scheduler puts decodes first: the leading one-token rows go to the decode kernel.
        num_decodes = next((i for i, n in enumerate(num_scheduled) if n != 1), len(num_scheduled))
        sampled = [s for s, keep in zip(states, is_sampled, strict=True) if keep]
        return StepInputs(
            input_ids=input_ids, token_rows=token_rows, positions=positions, slot_mapping=slot_mapping,
            query_start_loc=query_start_loc.to(torch.int32), seq_lens=seq_lens.to(torch.int32),
            block_tables=block_tables, max_query_len=max(num_scheduled),
            max_seq_len=max(c + n for c, n in zip(num_computed, num_scheduled, strict=True)),
            logits_indices=logits_indices, sampled=sampled,
            sampled_rows=torch.tensor([s.table_row for s in sampled], dtype=torch.int64),
            num_decodes=num_decodes, max_decode_seq_len=max(num_computed[:num_decodes], default=-1) + 1)

    def _prepare_decode(self, states: list[CachedRequestState], num_computed: list[int]) -> StepInputs:
        """One token per request (the common step): no repeat_interleave, no per-token Python."""
        num_seqs = len(states)
        positions = torch.tensor(num_computed, dtype=torch.int64)
        input_ids = torch.tensor([PENDING_TOKEN if c == len(s.token_ids) else s.token_ids[c]
                                  for s, c in zip(states, num_computed, strict=True)], dtype=torch.int64)
        token_rows = None
        if any(s.num_pending for s in states):
            token_rows = torch.tensor([s.table_row for s in states], dtype=torch.int64)
        block_tables = torch.nn.utils.rnn.pad_sequence(
            [s.block_table[:s.num_blocks] for s in states], batch_first=True)  # [B, max_blocks] int32
        rows = torch.arange(num_seqs)
        slot_mapping = (block_tables[rows, positions // self.block_size].long() * self.block_size
                        + positions % self.block_size)
        # A decode row samples unless the request still has known tokens after this one (a resumed
        # request's last prompt token is computed by a prefill chunk, never here).
        is_sampled = [c + 1 == s.num_tokens for s, c in zip(states, num_computed, strict=True)]
        sampled = [s for s, keep in zip(states, is_sampled, strict=True) if keep]
        return StepInputs(
            input_ids=input_ids, token_rows=token_rows, positions=positions, slot_mapping=slot_mapping,
            query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
            seq_lens=(positions + 1).to(torch.int32), block_tables=block_tables, max_query_len=1,
            max_seq_len=max(num_computed) + 1,
            logits_indices=rows[torch.tensor(is_sampled, dtype=torch.bool)], sampled=sampled,
            sampled_rows=torch.tensor([s.table_row for s in sampled], dtype=torch.int64))


@dataclass
class StepHandle:
    """A launched step: its sampled tokens on their way to the host (empty when nothing samples)."""

    sampled: list[CachedRequestState] = field(default_factory=list)
    token_ids: torch.Tensor | None = None  # [N] int64: pinned host memory on CUDA, filled by the copy
    event: torch.cuda.Event | None = None  # recorded after that copy
    logprobs: SampleLogprobs | None = None
    # Launched ahead with a grammar row: (logits, sampling metadata, token_buffer rows), sampled once
    # the step before it is read (ModelRunner._finish_deferred).
    deferred: tuple[torch.Tensor, SamplingMetadata, torch.Tensor] | None = None


@dataclass
class StepInputs:
    """One step's model inputs, built on the CPU."""

    input_ids: torch.Tensor  # [T] int64; PENDING_TOKEN where the token is still in token_buffer
    token_rows: torch.Tensor | None  # [T] int64 token_buffer rows, when some input is pending
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor  # [N] rows of the hidden states to sample from
    sampled: list[CachedRequestState]  # the N requests that produce a token this step
    sampled_rows: torch.Tensor  # [N] int64: their token_buffer rows
    num_decodes: int = 0  # leading one-token rows (AttentionMetadata.num_decodes)
    max_decode_seq_len: int = 0

    def to_device(self, device: torch.device, token_buffer: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, torch.Tensor]:
        """(input_ids, positions, attention metadata, logits_indices, sampled_rows) on the device.

        On CUDA every array travels in one pinned, non-blocking copy: a copy from pageable memory
        synchronises the host with the stream, so the step launched ahead (async scheduling) would
        wait for the step before it, and a mixed step would leave the GPU idle while it is prepared."""
        parts = [self.input_ids, self.positions, self.slot_mapping, self.query_start_loc, self.seq_lens,
                 self.block_tables.reshape(-1), self.logits_indices, self.sampled_rows]
        if self.token_rows is not None:
            parts.append(self.token_rows)
        # The CPU runs the same packing (without pinning), so its tests cover what the GPU runs.
        on_device = pack_int64(parts, device, pin_memory=device.type == "cuda")
        input_ids, positions, slot_mapping, query_start_loc, seq_lens, block_tables, logits_indices, sampled_rows = \
            on_device[:8]
        if self.token_rows is not None:
            input_ids = fill_pending_tokens(input_ids, token_buffer, on_device[8])
        attn_metadata = AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=query_start_loc.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=block_tables.to(torch.int32).view(self.block_tables.shape),
            max_query_len=self.max_query_len, max_seq_len=self.max_seq_len, num_decodes=self.num_decodes,
            max_decode_seq_len=self.max_decode_seq_len)
        return input_ids, positions, attn_metadata, logits_indices, sampled_rows


def pack_int64(parts: list[torch.Tensor], device: torch.device, pin_memory: bool) -> tuple[torch.Tensor, ...]:
    """The parts as int64 on `device`, moved in one (pinned, non-blocking) copy, each a view of the one
    buffer that starts on a 16-byte boundary (an even number of int64s): Triton specialises a kernel on
    its pointers' alignment, and a view aligned in one step and not in the next would compile a second
    variant mid-serving."""
    sizes = [p.numel() for p in parts]
    padded = [n + n % 2 for n in sizes]
    packed = torch.empty(sum(padded), dtype=torch.int64, pin_memory=pin_memory)  # pads are never read
    for part, view in zip(parts, packed.split(padded), strict=True):
        view[:part.numel()] = part.reshape(-1)
    moved = packed.to(device, non_blocking=pin_memory).split(padded)
    return tuple(v[:n] for v, n in zip(moved, sizes, strict=True))


def _logprobs_to_dicts(states: list[CachedRequestState], token_ids: list[int], logprobs: SampleLogprobs
                       ) -> dict[str, dict[int, float]]:
    wanted = [i for i, s in enumerate(states) if s.sampling_params.logprobs is not None]
    if not wanted:
        return {}
    rows = torch.tensor(wanted, device=logprobs.sampled_logprobs.device)
    top_ids = logprobs.top_token_ids[rows].tolist()
    top_values = logprobs.top_logprobs[rows].tolist()
    sampled_values = logprobs.sampled_logprobs[rows].tolist()
    result: dict[str, dict[int, float]] = {}
    for j, i in enumerate(wanted):
        num = states[i].sampling_params.logprobs or 0
        entry = dict(zip(top_ids[j][:num], top_values[j][:num], strict=True))
        entry[token_ids[i]] = sampled_values[j]
        result[states[i].req_id] = entry
    return result
