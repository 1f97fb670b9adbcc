"""EngineFrontend: what the worker sees of an engine. Validation and tokenizing in the caller's thread,
output processing (text, stop strings, callbacks) wherever the core's outputs arrive; the EngineCore
behind it runs its busy loop in a thread (engine/async_engine.py) or a child process (engine/mp_engine.py).
The two clients differ only in how a command reaches the core and how its outputs come back."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from engine.config import EngineConfig
from engine.core import AbortRequests, EngineCoreOutputs
from engine.errors import InvalidRequestError
from engine.input_processor import InputProcessor
from engine.output_processor import OutputCallback, OutputProcessor
from engine.outputs import FinishReason, RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

logger = logging.getLogger("tokenrelay.engine")

__all__ = ["EngineFrontend", "OutputCallback"]


class EngineFrontend(abc.ABC):
    """submit / abort / stats from any thread; outputs through per-request callbacks."""

    config: EngineConfig
    error: BaseException | None  # set once the core died: submit refuses, open requests got ERROR

    def __init__(self, config: EngineConfig, inputs: InputProcessor, stats: EngineStats) -> None:
        self.config = config
        self.inputs = inputs  # validation and tokenization, in the caller's thread
        self.max_model_len = inputs.max_model_len
        self.tokenizer = inputs.tokenizer
        self.eos_token_ids = inputs.eos_token_ids
        self.output_processor = OutputProcessor(inputs.tokenizer, inputs.tokenizer_lock)
        self.error = None
        self._stats = stats  # replaced whole by the outputs' thread: reading it needs no lock
        self._num_submitted = 0
        self._num_added = 0  # as last reported by the core

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def shutdown(self, timeout_s: float = 10.0) -> None: ...

    @property
    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @abc.abstractmethod
    def _send(self, command: Request | AbortRequests) -> None:
        """Hand a command to the core (any thread; never blocks on the core)."""

    # ---- requests ------------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        lane_rank: int = 0,
        resume_token_ids: list[int] | None = None,
        on_output: OutputCallback,
    ) -> None:
        """Validate in the caller's thread (errors raise here), then queue for the core."""
        if self.error is not None:
            raise RuntimeError(f"the engine loop has died: {self.error!r}")
        request = self.inputs.make_request(
            request_id, prompt, prompt_token_ids=prompt_token_ids, messages=messages, params=params,
            priority=priority, lane_rank=lane_rank, resume_token_ids=resume_token_ids)
        processor = self.output_processor
        try:
            with processor.lock:
                final = processor.add_request(request, on_output)
                if final is None:
                    self._num_submitted += 1
        except InvalidRequestError as exc:  # the id is live already: only this submission fails
            final = RequestOutput(request_id, [], "", FinishReason.ERROR, error=str(exc))
        if final is not None:
            _deliver([(on_output, final)])
            return
        self._send(request)

    def abort(self, request_id: str) -> None:
        self._send(AbortRequests([request_id]))

    async def stream(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        lane_rank: int = 0,
        resume_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas as the core produces them; the last one has finish_reason."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def deliver(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        self.submit(request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, messages=messages,
                    params=params, priority=priority, lane_rank=lane_rank,
                    resume_token_ids=resume_token_ids, on_output=deliver)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            # A consumer that stops early (cancelled task, break) frees the request's blocks.
            if not finished:
                self.abort(request_id)

    # ---- outputs (the thread that receives them) -------------------------------------------------
    def _on_core_outputs(self, batches: Sequence[EngineCoreOutputs]) -> None:
        """One or more turns of the busy loop: text, stop strings, then each request's callback."""
        processor = self.output_processor
        with processor.lock:
            processed = processor.process(o for batch in batches for o in batch.outputs)
        self._stats = batches[-1].stats
        self._num_added = batches[-1].num_added
        if processed.reqs_to_abort:  # already ended here: the core only has to free them
            self._send(AbortRequests(processed.reqs_to_abort, report=False))
        _deliver(processed.outputs)

    def _fail_all(self, message: str) -> None:
        with self.output_processor.lock:
            failed = self.output_processor.fail_all(message)
        _deliver(failed)

    # ---- load ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._stats

    def num_pending(self) -> int:
        """Requests submitted that the core has not taken in yet (not in stats() yet)."""
        return max(0, self._num_submitted - self._num_added)

    def has_capacity(self) -> int:
        """How many more requests the engine can usefully take now (sequence slots and free KV)."""
        s = self.stats()
        pending = self.num_pending()
        seq_slots = s.max_num_seqs - s.num_running - s.num_waiting - pending
        if s.num_waiting + pending > 0 and s.num_free_blocks < s.num_total_blocks // 20:
            return 0  # prompts already queue for memory: more would only wait here, not in Redis
        return max(0, seq_slots)


def _deliver(outputs: Sequence[tuple[OutputCallback | None, RequestOutput]]) -> None:
    for on_output, out in outputs:
        if on_output is None:
            continue
        try:
            on_output(out)
        except Exception:  # a broken consumer must not stop delivery for everyone else
            logger.exception("output callback failed for request=%s", out.request_id)
