"""EngineCore: the scheduler and the model runner behind one step(), in token ids only, and the one busy
loop that feeds it commands and ships its outputs, whichever thread or process it runs in.

Text, stop strings and callbacks are the frontend's (engine/output_processor.py): the core never sees a
tokenizer, so the loop that owns the GPU does nothing but schedule, run, sample and pack ids."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

import msgspec

from engine.config import EngineConfig
from engine.executor import ModelExecutor, MultiprocExecutor
from engine.hf_config import HFConfig, load_hf_config
from engine.input_processor import resolve_config_model, resolve_max_model_len
from engine.model_files import ModelFiles
from engine.model_runner import ModelRunner, StepHandle
from engine.outputs import EngineCoreOutput, FinishReason
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.stats import EngineStats
from engine.structured_output import StructuredOutputManager

logger = logging.getLogger("tokenrelay.engine")

_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
                   RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
                   RequestStatus.FINISHED_ABORTED: FinishReason.ABORT}


class AbortRequests(msgspec.Struct, array_like=True, tag=1, gc=False):
    """Stop these requests and free their blocks. `report`: the core sends each one a final ABORT output;
    False when the frontend has already ended them itself (a stop string matched)."""

    request_ids: list[str]
    report: bool = True


class Shutdown(msgspec.Struct, array_like=True, tag=2):
    """Leave the busy loop."""


class EngineCoreOutputs(msgspec.Struct, array_like=True, tag=3, gc=False):
    """What one turn of the busy loop sends its client."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    num_added: int  # add commands taken in since start (the client counts the ones still on their way)


Command = Request | AbortRequests | Shutdown


class CoreChannel(Protocol):
    """How commands reach the busy loop and its outputs leave it: a queue in a thread, pipes to a process."""

    def receive(self, block: bool) -> list[Command]:
        """Every command there is; when `block`, wait a while for the first (an empty list: none came)."""

    def send(self, outputs: EngineCoreOutputs) -> None: ...


class EngineCore:
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None,
                 hf_config: HFConfig | None = None) -> None:
        files = files if files is not None else resolve_config_model(config)
        hf_config = hf_config if hf_config is not None else load_hf_config(files)
        self.config = config
        self.max_model_len = max_model_len = resolve_max_model_len(config, hf_config)
        self.structured_output = StructuredOutputManager(lambda: _vocabulary(files), hf_config.vocab_size)
        self.executor: ModelExecutor
        self._tp_executor: MultiprocExecutor | None = None
        if config.tensor_parallel_size > 1:
            self._tp_executor = self.executor = MultiprocExecutor(
                config, files, hf_config, max_model_len, self.structured_output)
            self.model_runner = self._tp_executor.driver
        else:  # one device: the runner itself, nothing in between
            self.model_runner = self.executor = ModelRunner(
                config, files, hf_config, max_model_len, self.structured_output)
        try:
            self.num_kv_blocks = self.executor.num_kv_blocks_from_memory()
            self.executor.allocate_kv_cache(self.num_kv_blocks)
            self.executor.capture_cudagraphs()
        except BaseException:
            self.shutdown()
            raise
        self.scheduler = Scheduler(config, self.num_kv_blocks, max_model_len)
        self.vocab_size: int = hf_config.vocab_size
        self._finished_outputs: list[EngineCoreOutput] = []  # aborts and rejects, sent by the next step()
        # Async scheduling: the step launched ahead by the last step() call, its tokens not yet read.
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None
        self.num_added = 0
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.peak_kv_usage = 0.0
        self.kv_waste_at_peak = 0.0
        self._next_waste_check = 0.0  # kv_waste() loops over live requests: at most every 1% of usage
        logger.info("engine ready model=%s device=%s tensor_parallel_size=%d kv_blocks=%d block_size=%d "
                    "max_model_len=%d", files.name, config.device, config.tensor_parallel_size,
                    self.num_kv_blocks, config.block_size, max_model_len)

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do on one device)."""
        if self._tp_executor is not None:
            self._tp_executor.shutdown()

    # ---- requests in and out -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Hand a validated request to the scheduler; ValueError (a duplicate id, more KV than exists)
        when it can never run."""
        self.num_added += 1
        if request.sampling_params.structured_output is not None:
            # Compiled here, once per spec (cached; InvalidRequestError when it cannot be): the runner's
            # matchers take it from the cache.
            self.structured_output.compile(request.sampling_params.structured_output)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str], *, report: bool = True) -> None:
        """Stop requests and free their blocks; unknown or finished ids are ignored. With `report` the
        next step() sends each a final ABORT output."""
        for request in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED):
            if report:
                self._finished_outputs.append(EngineCoreOutput(
                    request.request_id, [], FinishReason.ABORT,
                    num_cached_tokens=max(request.num_cached_tokens, 0)))
        self._drain_if_idle()

    def _reject(self, request_id: str, message: str) -> None:
        self._finished_outputs.append(EngineCoreOutput(request_id, [], FinishReason.ERROR, error=message))

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """One step's outputs. With async scheduling the next step is scheduled and launched before
        this one's tokens are read, so the GPU runs it while the host updates and packs outputs."""
        outputs, self._finished_outputs = self._finished_outputs, []
        if self._inflight is not None:
            scheduler_output, handle = self._inflight
            self._inflight = None
        else:
            scheduler_output = self.scheduler.schedule()
            handle = self.executor.launch(scheduler_output)
        if (self.config.async_scheduling and not scheduler_output.is_empty
                and self.scheduler.can_schedule_ahead()):
            ahead = self.scheduler.schedule_ahead()
            if ahead is not None:
                self._inflight = (ahead, self.executor.launch(ahead))
        outputs += self._update(scheduler_output, self.executor.wait(handle))
        self._drain_if_idle()
        return outputs

    def _drain_if_idle(self) -> None:
        if self._inflight is not None and not self.scheduler.has_unfinished_requests():
            # Every request ended (EOS, aborts, stop strings) under the step launched ahead: it only
            # computed dropped rows. Read it now, so an idle engine holds nothing in flight.
            ahead, handle = self._inflight
            self._inflight = None
            self._update(ahead, self.executor.wait(handle))

    def _update(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        updated = self.scheduler.update_from_output(scheduler_output, runner_output)
        self.num_steps += 1
        self.num_generated_tokens += len(updated)
        self._track_kv_peak()
        logprobs = runner_output.logprobs
        outputs = []
        for request in updated:
            req_id = request.request_id
            token_logprobs = logprobs.get(req_id) if logprobs else None
            status = request.status
            outputs.append(EngineCoreOutput(
                req_id, [request.output_token_ids[-1]], _FINISH_REASONS[status] if status.is_finished else None,
                None if token_logprobs is None else [token_logprobs], max(request.num_cached_tokens, 0)))
        return outputs

    def _track_kv_peak(self) -> None:
        usage = self.scheduler.kv_usage
        if usage > self.peak_kv_usage:
            self.peak_kv_usage = usage
            if usage >= self._next_waste_check:
                self.kv_waste_at_peak = self.scheduler.kv_waste()
                self._next_waste_check = usage + 0.01

    # ---- state -------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._finished_outputs)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting,
            num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks,
            kv_usage=s.kv_usage, prefix_cache_hit_rate=s.prefix_cache_hit_rate,
            num_preemptions=s.num_preemptions, num_generated_tokens=self.num_generated_tokens,
            num_steps=self.num_steps, max_num_seqs=self.config.max_num_seqs)

    # ---- the busy loop -----------------------------------------------------------------------
    def run_busy_loop(self, channel: CoreChannel) -> None:
        """Take commands, step while anything is unfinished, send each step's outputs; until Shutdown.

        Idle, it waits in channel.receive; busy, it only looks at what has arrived between two steps."""
        while True:
            idle = not self.has_unfinished()
            commands = channel.receive(block=idle)
            if idle and not commands:
                continue
            for command in commands:
                if isinstance(command, Request):
                    try:
                        self.add_request(command)
                    except ValueError as exc:  # e.g. a duplicate id: only this request fails
                        logger.warning("request=%s rejected: %s", command.request_id, exc)
                        self._reject(command.request_id, str(exc))
                elif isinstance(command, AbortRequests):
                    self.abort_requests(command.request_ids, report=command.report)
                else:
                    return
            outputs = self.step() if self.has_unfinished() else []
            channel.send(EngineCoreOutputs(outputs, self.stats(), self.num_added))


def _vocabulary(files: ModelFiles) -> tuple[Any, frozenset[int]]:
    """The tokenizer and EOS ids a grammar compiles against (loaded on the first structured request)."""
    from engine.tokenizer import eos_token_ids, load_tokenizer

    tokenizer = load_tokenizer(files.config_dir)
    return tokenizer, eos_token_ids(files.config_dir, tokenizer)
