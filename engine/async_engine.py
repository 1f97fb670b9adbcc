"""AsyncEngine: the LLMEngine step loop in its own thread, fed through a thread-safe inbox.

The loop thread is the only one that touches the scheduler and the GPU; callers submit, abort and
read stats from any thread, and `stream()` bridges outputs into asyncio. EngineFrontend is what the
worker sees of an engine: this thread engine, or MPEngine (engine/mp_engine.py, the loop in a child
process)."""

from __future__ import annotations

import abc
import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.input_processor import InputProcessor
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

logger = logging.getLogger("tokenrelay.engine")

OutputCallback = Callable[[RequestOutput], None]


@dataclass
class _Add:
    request: Request
    on_output: OutputCallback


@dataclass
class _Abort:
    request_id: str


class EngineFrontend(abc.ABC):
    """submit / abort / stats from any thread; outputs through per-request callbacks."""

    config: EngineConfig
    inputs: InputProcessor  # validation and tokenization, in the caller's thread
    max_model_len: int
    eos_token_ids: frozenset[int]
    error: BaseException | None

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def shutdown(self, timeout_s: float = 10.0) -> None: ...

    @property
    @abc.abstractmethod
    def is_running(self) -> bool: ...

    def submit(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        resume_token_ids: list[int] | None = None,
        on_output: OutputCallback,
    ) -> None:
        """Validate in the caller's thread (errors raise here), then queue for the loop."""
        if self.error is not None:
            raise RuntimeError(f"the engine loop has died: {self.error!r}")
        request = self.inputs.make_request(
            request_id, prompt, prompt_token_ids=prompt_token_ids, messages=messages, params=params,
            priority=priority, resume_token_ids=resume_token_ids)
        self._enqueue(request, on_output)

    @abc.abstractmethod
    def _enqueue(self, request: Request, on_output: OutputCallback) -> None:
        """Hand a validated request to the loop; its outputs go to on_output."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def num_pending(self) -> int:
        """Requests submitted that the loop has not taken in yet (not in stats() yet)."""

    async def stream(
        self,
        request_id: str,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        params: SamplingParams | None = None,
        priority: int = 0,
        resume_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas as the loop produces them; the last one has finish_reason."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def deliver(out: RequestOutput) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        self.submit(request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, messages=messages,
                    params=params, priority=priority, resume_token_ids=resume_token_ids,
                    on_output=deliver)
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

    def has_capacity(self) -> int:
        """How many more requests the engine can usefully take now (sequence slots and free KV)."""
        s = self.stats()
        pending = self.num_pending()
        seq_slots = s.max_num_seqs - s.num_running - s.num_waiting - pending
        if s.num_waiting + pending > 0 and s.num_free_blocks < s.num_total_blocks // 20:
            return 0  # prompts already queue for memory: more would only wait here, not in Redis
        return max(0, seq_slots)


def error_output(request_id: str, message: str) -> RequestOutput:
    """The final output of a request the engine could not serve (rejected, or the loop died)."""
    return RequestOutput(request_id=request_id, token_ids=[], text=message, finish_reason="abort",
                         extra={"error": 1.0})


class AsyncEngine(EngineFrontend):
    def __init__(self, config: EngineConfig, *, engine: LLMEngine | None = None) -> None:
        self.engine = engine if engine is not None else LLMEngine(config)
        self.config = config
        self.inputs = self.engine.inputs
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = self.engine.tokenizer
        self.eos_token_ids = self.engine.eos_token_ids
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._callbacks: dict[str, OutputCallback] = {}
        self._num_pending = 0  # submitted, not yet taken in by the loop
        self._pending_lock = threading.Lock()
        self._stats = self.engine.stats()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None  # set if the loop died

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="tokenrelay-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- requests ------------------------------------------------------------------------------
    def _enqueue(self, request: Request, on_output: OutputCallback) -> None:
        with self._pending_lock:
            self._num_pending += 1
        self._inbox.put(_Add(request, on_output))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    # ---- load ----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return self._stats  # replaced whole by the loop after each step: reading it needs no lock

    def num_pending(self) -> int:
        with self._pending_lock:
            return self._num_pending

    # ---- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping.is_set():
                block = not engine.has_unfinished()
                if not self._drain_inbox(block=block):
                    break
                if engine.has_unfinished():
                    for out in engine.step():
                        self._dispatch(out)
                self._stats = engine.stats()
        except BaseException as exc:  # the loop must not die silently: fail every open request
            logger.exception("engine loop died")
            self.error = exc
            for req_id, callback in list(self._callbacks.items()):
                callback(error_output(req_id, ""))
            self._callbacks.clear()

    def _drain_inbox(self, *, block: bool) -> bool:
        """Apply queued adds/aborts; wait for one when idle. Returns False on shutdown."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if isinstance(item, _Add):
                with self._pending_lock:
                    self._num_pending -= 1
                self._add(item)
            else:
                self.engine.abort(item.request_id)

    def _add(self, item: _Add) -> None:
        req_id = item.request.request_id
        try:
            self.engine.add(item.request)
        except ValueError as exc:  # e.g. a duplicate id: only this request fails
            logger.warning("request=%s rejected: %s", req_id, exc)
            item.on_output(error_output(req_id, str(exc)))
            return
        self._callbacks[req_id] = item.on_output

    def _dispatch(self, out: RequestOutput) -> None:
        callback = self._callbacks.get(out.request_id)
        if callback is None:
            return
        if out.finished:
            del self._callbacks[out.request_id]
        try:
            callback(out)
        except Exception:  # a broken consumer must not stop the loop for everyone else
            logger.exception("output callback failed for request=%s", out.request_id)
