"""LLMEngine: the offline, synchronous engine (`generate`, or `add_request` + `step()`), in one thread.

The EngineCore (token ids) and the OutputProcessor (text) called directly, without a loop of its own:
input processing -> core.step() -> output processing, and the aborts stop strings cause straight back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.hf_config import load_hf_config
from engine.input_processor import InputProcessor, resolve_config_model
from engine.model_files import ModelFiles
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats


class LLMEngine:
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None) -> None:
        self.config = config
        self.files = files if files is not None else resolve_config_model(config)
        hf_config = load_hf_config(self.files)
        self.inputs = InputProcessor(config, self.files, hf_config)
        self.core = EngineCore(config, self.files, hf_config)
        self.output_processor = OutputProcessor(self.inputs.tokenizer, self.inputs.tokenizer_lock)
        self.max_model_len = self.inputs.max_model_len
        self.tokenizer = self.inputs.tokenizer
        self.eos_token_ids = self.inputs.eos_token_ids
        self.tokenizer_lock = self.inputs.tokenizer_lock
        self.vocab_size: int = hf_config.vocab_size
        self._finished: list[RequestOutput] = []  # ended at add_request: reported by the next step()

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any (they also exit with this process)."""
        self.core.shutdown()

    # The core's parts and counters, for benchmarks and tests that look inside.
    @property
    def scheduler(self) -> Any:
        return self.core.scheduler

    @property
    def model_runner(self) -> Any:
        return self.core.model_runner

    @property
    def num_kv_blocks(self) -> int:
        return self.core.num_kv_blocks

    @property
    def num_steps(self) -> int:
        return self.core.num_steps

    @property
    def peak_kv_usage(self) -> float:
        return self.core.peak_kv_usage

    @property
    def kv_waste_at_peak(self) -> float:
        return self.core.kv_waste_at_peak

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
        lane_rank: int = 0,
        resume_token_ids: list[int] | None = None,
    ) -> Request:
        """Validate and tokenize without touching the scheduler."""
        return self.inputs.make_request(request_id, prompt, prompt_token_ids=prompt_token_ids,
                                        messages=messages, params=params, priority=priority,
                                        lane_rank=lane_rank, resume_token_ids=resume_token_ids)

    def add(self, request: Request, *, stream: bool = True) -> None:
        """Hand a validated request to the core; ValueError when it can never run.

        stream=False (offline generate): no deltas, one whole output at the end, its text decoded once
        then (unless stop strings need it as it grows)."""
        with self.tokenizer_lock:
            final = self.output_processor.add_request(request, stream=stream)
        if final is not None:
            self._finished.append(final)
            return
        try:
            self.core.add_request(request)
        except ValueError:
            self.output_processor.remove(request.request_id)
            raise

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        lane_rank: int = 0,
        resume_token_ids: list[int] | None = None,
        stream: bool = True,
    ) -> None:
        self.add(self.make_request(request_id, prompt, prompt_token_ids=prompt_token_ids,
                                   messages=messages, params=params, priority=priority,
                                   lane_rank=lane_rank, resume_token_ids=resume_token_ids), stream=stream)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; the next step() reports it with finish_reason "abort"."""
        self.core.abort_requests([request_id])

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step's outputs (deltas of streamed requests, whole outputs of the others as they end)."""
        outputs, self._finished = self._finished, []
        core_outputs = self.core.step()
        with self.tokenizer_lock:
            processed = self.output_processor.process(core_outputs)
        if processed.reqs_to_abort:  # stop strings: ended here already, the core only frees them
            self.core.abort_requests(processed.reqs_to_abort, report=False)
        outputs += [out for _, out in processed.outputs]
        return outputs

    # ---- state -------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.core.has_unfinished() or bool(self._finished)

    def stats(self) -> EngineStats:
        return self.core.stats()

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
                    self.add_request(req_id, prompt, params=p_k, stream=False)
                else:
                    self.add_request(req_id, prompt_token_ids=list(prompt), params=p_k, stream=False)
                order.append(req_id)
        results: dict[str, RequestOutput | None] = dict.fromkeys(order)
        num_left = len(order)
        while num_left:
            for out in self.step():
                if out.finished and results.get(out.request_id, out) is None:
                    results[out.request_id] = out
                    num_left -= 1
        return [out for out in results.values() if out is not None]
