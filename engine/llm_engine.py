"""LLMEngine: the synchronous step loop (schedule -> run -> update -> detokenize) and its front door.

It owns the scheduler, the model runner and one detokenizer per live request; nothing else does."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.input_processor import InputProcessor, resolve_config_model
from engine.loader import load_hf_config
from engine.model_files import ModelFiles
from engine.model_runner import ModelRunner, StepHandle
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.stats import EngineStats

logger = logging.getLogger("tokenrelay.engine")


@dataclass
class _Timing:
    arrival_s: float
    first_token_s: float | None = None


@dataclass
class _Aggregate:
    """What generate() accumulates for one request out of the step deltas."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    last: RequestOutput | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None) -> None:
        self.config = config
        self.files = files if files is not None else resolve_config_model(config)
        hf_config = load_hf_config(self.files)
        self.inputs = InputProcessor(config, self.files, hf_config)
        self.max_model_len = self.inputs.max_model_len
        self.tokenizer = self.inputs.tokenizer
        self.eos_token_ids = self.inputs.eos_token_ids
        self.tokenizer_lock = self.inputs.tokenizer_lock
        self.model_runner = ModelRunner(config, self.files, hf_config, self.max_model_len)
        self.num_kv_blocks = self.model_runner.num_kv_blocks_from_memory()
        self.model_runner.allocate_kv_cache(self.num_kv_blocks)
        self.model_runner.capture_cudagraphs()
        self.scheduler = Scheduler(config, self.num_kv_blocks, self.max_model_len)
        self.vocab_size: int = hf_config.vocab_size
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._timings: dict[str, _Timing] = {}
        self._pending_outputs: list[RequestOutput] = []  # aborts reported by the next step()
        self._no_text: set[str] = set()  # requests whose text another process decodes
        # Async scheduling: the step launched ahead by the last step() call, its tokens not yet read.
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.peak_kv_usage = 0.0
        self.kv_waste_at_peak = 0.0
        self._next_waste_check = 0.0  # kv_waste() loops over live requests: at most every 1% of usage
        logger.info("engine ready model=%s device=%s kv_blocks=%d block_size=%d max_model_len=%d",
                    self.files.name, config.device, self.num_kv_blocks, config.block_size,
                    self.max_model_len)

    # ---- requests in -------------------------------------------------------------------------
    def make_request(
        self,
        request_id: str,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        resume_token_ids: list[int] | None = None,
    ) -> Request:
        """Validate and tokenize without touching the scheduler: safe to call from any thread."""
        return self.inputs.make_request(request_id, prompt, prompt_token_ids=prompt_token_ids,
                                        messages=messages, params=params, priority=priority,
                                        resume_token_ids=resume_token_ids)

    def add(self, request: Request, *, stream_text: bool = True, detokenize: bool = True) -> None:
        """Hand a validated request to the scheduler (engine thread only).

        stream_text=False (offline generate) decodes the text once at the end instead of every step,
        unless stop strings need the incremental text; deltas then carry token ids and empty text.
        detokenize=False: no text at all unless stop strings need it (the caller decodes elsewhere)."""
        self.scheduler.add_request(request)
        if not detokenize and not request.sampling_params.stop:
            self._no_text.add(request.request_id)
        elif stream_text or request.sampling_params.stop or request.output_token_ids:
            with self.tokenizer_lock:
                # A resumed request's tokens count as already streamed.
                detokenizer = self._detokenizer(request, request.output_token_ids)
            self._detokenizers[request.request_id] = detokenizer
            if detokenizer.stopped:
                # Resumed after its stop string was complete (the worker that generated it died before
                # the final event): it is done, and one more token would change the completion.
                self._timings[request.request_id] = _Timing(arrival_s=time.monotonic())
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
                self._pending_outputs.append(self._final_output(request, [], "", None, "stop"))
                return
        self._timings[request.request_id] = _Timing(arrival_s=time.monotonic())

    def _detokenizer(self, request: Request, initial_output_token_ids: Sequence[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                      stop=request.sampling_params.stop,
                                      initial_output_token_ids=initial_output_token_ids)

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        resume_token_ids: list[int] | None = None,
        stream_text: bool = True,
    ) -> None:
        self.add(self.make_request(request_id, prompt, prompt_token_ids=prompt_token_ids,
                                   messages=messages, params=params, priority=priority,
                                   resume_token_ids=resume_token_ids), stream_text=stream_text)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; the next step() reports it with finish_reason "abort"."""
        request = self.scheduler.get_request(request_id)
        if request is None or request.is_finished:
            return
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        self._pending_outputs.append(self._final_output(request, [], "", None))

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step's outputs. With async scheduling the next step is scheduled and launched before
        this one's tokens are read, so the GPU runs it while the host updates and detokenizes."""
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._inflight is not None:
            scheduler_output, handle = self._inflight
            self._inflight = None
        else:
            scheduler_output = self.scheduler.schedule()
            handle = self.model_runner.launch(scheduler_output)
        if (self.config.async_scheduling and not scheduler_output.is_empty
                and self.scheduler.can_schedule_ahead()):
            ahead = self.scheduler.schedule_ahead()
            if ahead is not None:
                self._inflight = (ahead, self.model_runner.launch(ahead))
        outputs += self._update(scheduler_output, self.model_runner.wait(handle))
        if self._inflight is not None and not self.scheduler.has_unfinished_requests():
            # Every request ended (EOS, stop strings, aborts) under the step launched ahead: it only
            # computed dropped rows. Read it now, so an idle engine holds nothing in flight.
            ahead, handle = self._inflight
            self._inflight = None
            self._update(ahead, self.model_runner.wait(handle))
        return outputs

    def _update(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        self.num_steps += 1
        self._track_kv_peak()
        stopped_ids: list[str] = []
        with self.tokenizer_lock:
            for request in updated:
                outputs.append(self._delta(request, runner_output, stopped_ids))
        if stopped_ids:
            self.scheduler.finish_requests(stopped_ids, RequestStatus.FINISHED_STOPPED)
        return outputs

    def _delta(self, request: Request, runner_output: ModelRunnerOutput,
               stopped_ids: list[str]) -> RequestOutput:
        req_id = request.request_id
        output_token_ids = request.output_token_ids
        token_id = output_token_ids[-1]
        self.num_generated_tokens += 1
        timing = self._timings[req_id]
        if timing.first_token_s is None:
            timing.first_token_s = time.monotonic()
        finish_reason = request.finish_reason
        detokenizer = self._detokenizers.get(req_id)
        if detokenizer is None:  # deferred: the whole text once, in the final output
            text = ""
            if finish_reason is not None and req_id not in self._no_text:
                detokenizer = self._detokenizer(request, ())
                text = detokenizer.update(output_token_ids) + detokenizer.flush()
        else:
            text = detokenizer.update((token_id,))
            if detokenizer.stopped and finish_reason is None:
                finish_reason = RequestStatus.FINISHED_STOPPED.value
                stopped_ids.append(req_id)
            elif finish_reason is not None and not detokenizer.stopped:
                text += detokenizer.flush()
        logprobs = None
        if runner_output.logprobs and request.sampling_params.logprobs is not None:
            token_logprobs = runner_output.logprobs.get(req_id)
            if token_logprobs is not None:
                logprobs = [token_logprobs]
        if finish_reason is not None:
            return self._final_output(request, [token_id], text, logprobs, finish_reason)
        num_cached_tokens = request.num_cached_tokens
        return RequestOutput(request_id=req_id, token_ids=[token_id], text=text, logprobs=logprobs,
                             index=len(output_token_ids) - 1, num_prompt_tokens=len(request.prompt_token_ids),
                             num_cached_tokens=num_cached_tokens if num_cached_tokens > 0 else 0)

    def _final_output(self, request: Request, token_ids: list[int], text: str,
                      logprobs: list[dict[int, float]] | None,
                      finish_reason: str = "abort") -> RequestOutput:
        req_id = request.request_id
        self._detokenizers.pop(req_id, None)
        self._no_text.discard(req_id)
        timing = self._timings.pop(req_id, None)
        extra: dict[str, float] = {}
        if timing is not None:
            now = time.monotonic()
            extra["e2e_s"] = now - timing.arrival_s
            if timing.first_token_s is not None:
                extra["ttft_s"] = timing.first_token_s - timing.arrival_s
        return RequestOutput(request_id=req_id, token_ids=token_ids, text=text,
                             finish_reason=finish_reason, logprobs=logprobs,
                             index=request.num_output_tokens - len(token_ids),
                             num_prompt_tokens=request.num_prompt_tokens,
                             num_cached_tokens=max(request.num_cached_tokens, 0), extra=extra)

    def _track_kv_peak(self) -> None:
        usage = self.scheduler.kv_usage
        if usage > self.peak_kv_usage:
            self.peak_kv_usage = usage
            if usage >= self._next_waste_check:
                self.kv_waste_at_peak = self.scheduler.kv_waste()
                self._next_waste_check = usage + 0.01

    # ---- state -------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending_outputs)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks,
            kv_usage=s.kv_usage, prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            num_preemptions=s.num_preemptions, num_generated_tokens=self.num_generated_tokens,
            num_steps=self.num_steps, max_num_seqs=self.config.max_num_seqs)

    # ---- offline batch -----------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; whole outputs in input order (n per prompt, consecutive)."""
        if isinstance(params, SamplingParams) or params is None:
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        order: list[str] = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            for k in range(p.n):
                req_id = f"generate-{self.num_steps}-{i}" + (f"-{k}" if p.n > 1 else "")
                if p.n > 1 and p.seed is not None:
                    # n samples of one seeded prompt must differ from each other.
                    p_k = SamplingParams(**{**p.__dict__, "seed": p.seed + k, "n": 1})
                else:
                    p_k = p
                if isinstance(prompt, str):
                    self.add_request(req_id, prompt, params=p_k, stream_text=False)
                else:
                    self.add_request(req_id, prompt_token_ids=list(prompt), params=p_k, stream_text=False)
                order.append(req_id)
        aggregates = {req_id: _Aggregate() for req_id in order}
        while any(aggregates[r].last is None for r in order):
            for out in self.step():
                agg = aggregates.get(out.request_id)
                if agg is None:
                    continue
                agg.token_ids.extend(out.token_ids)
                agg.text.append(out.text)
                if out.logprobs:
                    agg.logprobs.extend(out.logprobs)
                if out.finished:
                    agg.last = out
        results = []
        for req_id in order:
            agg = aggregates[req_id]
            last = agg.last
            assert last is not None
            results.append(RequestOutput(
                request_id=req_id, token_ids=agg.token_ids, text="".join(agg.text),
                finish_reason=last.finish_reason,
                logprobs=agg.logprobs if agg.logprobs else None, index=0,
                num_prompt_tokens=last.num_prompt_tokens, num_cached_tokens=last.num_cached_tokens,
                extra=last.extra))
        return results
