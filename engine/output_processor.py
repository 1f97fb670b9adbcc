"""OutputProcessor: the core's token ids -> RequestOutputs with text, in the frontend's process.

It owns each live request's detokenizer, its stop strings (a match ends the request here and asks the
core to abort it), its timings and its output callback. One set of rules for the offline engine, the
thread engine and the process engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.outputs import EngineCoreOutput, FinishReason, RequestOutput
from engine.request import Request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OutputCallback = Callable[[RequestOutput], None]

_FLUSHED = (FinishReason.STOP, FinishReason.LENGTH)  # an aborted or failed request keeps its held-back text


@dataclass(slots=True, eq=False)
class _RequestState:
    request_id: str
    prompt_token_ids: list[int]
    on_output: OutputCallback | None
    # stream: a delta per step with its text. Otherwise one whole output at the end (offline generate),
    # decoded once then, unless stop strings need the text as it grows.
    stream: bool
    detokenizer: IncrementalDetokenizer | None  # None: decoded once at the end
    num_output_tokens: int  # completion tokens so far, resumed ones included (the next delta's index)
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    # Not streamed: everything so far, for the one output at the end.
    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class ProcessedOutputs:
    outputs: list[tuple[OutputCallback | None, RequestOutput]]  # in the order the core sent them
    reqs_to_abort: list[str]  # ended here by a stop string or a failure: the core must stop them


class OutputProcessor:
    """Not thread-safe by itself: callers serialize add_request / process / fail_all with `lock`, the
    tokenizer's lock (the input processor encodes with the same tokenizer in another thread)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, lock: threading.Lock) -> None:
        self.tokenizer = tokenizer
        self.lock = lock
        self._states: dict[str, _RequestState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def add_request(self, request: Request, on_output: OutputCallback | None = None, *,
                    stream: bool = True) -> RequestOutput | None:
        """Track a request before the core sees it. Returns its final output when it needs no step at all
        (resumed after its stop string was complete: one more token would change the completion); the
        caller then does not send it to the core. InvalidRequestError for an id already live."""
        req_id = request.request_id
        if req_id in self._states:
            raise InvalidRequestError(f"request id {req_id!r} is already in the engine; give each request a "
                                      f"unique id")
        stop = request.sampling_params.stop
        resumed = request.output_token_ids
        detokenizer = None
        if stream or stop or resumed:
            # A resumed request's tokens count as already streamed.
            detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, stop=stop,
                                                 initial_output_token_ids=resumed)
        state = _RequestState(req_id, request.prompt_token_ids, on_output, stream, detokenizer, len(resumed))
        if detokenizer is not None and detokenizer.stopped:
            return self._final(state, [], "", None, FinishReason.STOP, 0)
        self._states[req_id] = state
        return None

    def remove(self, request_id: str) -> None:
        """Forget a request the core refused."""
        self._states.pop(request_id, None)

    def process(self, core_outputs: Iterable[EngineCoreOutput]) -> ProcessedOutputs:
        """Outputs of one or more core steps. A request's outputs from several steps (a process frontend
        that fell behind) are merged into one, so it decodes and delivers once for all of them."""
        merged: dict[str, EngineCoreOutput] = {}
        for core_output in core_outputs:
            earlier = merged.get(core_output.request_id)
            if earlier is None:
                merged[core_output.request_id] = core_output
            elif earlier.finish_reason is None:  # nothing counts after a request's end
                merged[core_output.request_id] = _merge(earlier, core_output)
        result = ProcessedOutputs([], [])
        states = self._states
        now = time.monotonic()
        for req_id, core_output in merged.items():
            state = states.get(req_id)
            if state is None:
                continue  # ended here already (stop string, failure) or never ours
            try:
                out = self._output(state, core_output, now, result.reqs_to_abort)
            except Exception as exc:  # this request fails, never silently, and the others go on
                states.pop(req_id, None)
                if core_output.finish_reason is None:
                    result.reqs_to_abort.append(req_id)
                out = self._final(state, [], "", None, FinishReason.ERROR, core_output.num_cached_tokens,
                                  error=f"turning its tokens into output failed: {exc!r}")
            if out is not None:
                result.outputs.append((state.on_output, out))
        return result

    def fail_all(self, message: str) -> list[tuple[OutputCallback | None, RequestOutput]]:
        """The core is gone: a final ERROR output for every live request."""
        states, self._states = self._states, {}
        return [(s.on_output, self._final(s, [], "", None, FinishReason.ERROR, 0, error=message))
                for s in states.values()]

    # ---- one request ---------------------------------------------------------------------------
    def _output(self, state: _RequestState, core_output: EngineCoreOutput, now: float,
                reqs_to_abort: list[str]) -> RequestOutput | None:
        token_ids = core_output.new_token_ids
        logprobs = core_output.new_logprobs
        finish_reason = core_output.finish_reason
        if state.first_token_s is None and token_ids:
            state.first_token_s = now
        detokenizer = state.detokenizer
        if detokenizer is None:  # not streamed, no stop strings (offline generate): only collect
            state.token_ids += token_ids
            if logprobs is not None:
                state.logprobs += logprobs
            if finish_reason is None:
                return None
            del self._states[state.request_id]
            text = ""
            if finish_reason in _FLUSHED:  # the whole text, decoded once
                whole = IncrementalDetokenizer(self.tokenizer, state.prompt_token_ids)
                text = whole.update(state.token_ids) + whole.flush()
            return self._final(state, state.token_ids, text, state.logprobs or None, finish_reason,
                               core_output.num_cached_tokens, index=0, error=core_output.error)
        if detokenizer.stop:
            text, num_kept = _update_until_stop(detokenizer, token_ids)
            if detokenizer.stopped and (finish_reason is None or num_kept < len(token_ids)):
                # The stop string ends it here, before the core's own end (if any) came.
                if finish_reason is None:
                    reqs_to_abort.append(state.request_id)
                finish_reason = FinishReason.STOP
                token_ids = token_ids[:num_kept]
                logprobs = None if logprobs is None else logprobs[:num_kept]
        else:
            text = detokenizer.update(token_ids) if token_ids else ""
        if finish_reason is not None:
            del self._states[state.request_id]
            if finish_reason in _FLUSHED and not detokenizer.stopped:
                text += detokenizer.flush()
        if state.stream:
            index = state.num_output_tokens
            state.num_output_tokens = index + len(token_ids)
            if finish_reason is None:
                return RequestOutput(state.request_id, token_ids, text, None, logprobs, index,
                                     len(state.prompt_token_ids), core_output.num_cached_tokens)
            return self._final(state, token_ids, text, logprobs, finish_reason, core_output.num_cached_tokens,
                               index=index, error=core_output.error)
        # Not streamed, but decoded as it grows (stop strings, a resumed request): collect.
        state.token_ids += token_ids
        state.text_parts.append(text)
        if logprobs is not None:
            state.logprobs += logprobs
        if finish_reason is None:
            return None
        return self._final(state, state.token_ids, "".join(state.text_parts), state.logprobs or None,
                           finish_reason, core_output.num_cached_tokens, index=0, error=core_output.error)

    @staticmethod
    def _final(state: _RequestState, token_ids: list[int], text: str, logprobs: list[dict[int, float]] | None,
               finish_reason: FinishReason, num_cached_tokens: int, *, index: int | None = None,
               error: str | None = None) -> RequestOutput:
        now = time.monotonic()
        extra = {"e2e_s": now - state.arrival_s}
        if state.first_token_s is not None:
            extra["ttft_s"] = state.first_token_s - state.arrival_s
        if finish_reason is FinishReason.ERROR and error is None:
            error = ""
        return RequestOutput(state.request_id, token_ids, text, finish_reason, logprobs,
                             state.num_output_tokens if index is None else index, len(state.prompt_token_ids),
                             num_cached_tokens, extra, error)


def _merge(earlier: EngineCoreOutput, later: EngineCoreOutput) -> EngineCoreOutput:
    """Two consecutive outputs of one request as one (fresh lists: never grow the earlier one's)."""
    logprobs = earlier.new_logprobs
    if later.new_logprobs is not None:
        logprobs = [*(logprobs or []), *later.new_logprobs]
    return EngineCoreOutput(earlier.request_id, earlier.new_token_ids + later.new_token_ids,
                            later.finish_reason, logprobs, later.num_cached_tokens, later.error)


def _update_until_stop(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> tuple[str, int]:
    """Feed tokens one at a time, so a stop string ends the output at the token that completed it:
    (text, number of tokens kept)."""
    if len(token_ids) == 1:
        return detokenizer.update(token_ids), 1
    parts = []
    for i, token_id in enumerate(token_ids):
        parts.append(detokenizer.update((token_id,)))
        if detokenizer.stopped:
            return "".join(parts), i + 1
    return "".join(parts), len(token_ids)
