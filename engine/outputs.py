"""What the engine hands back: EngineCoreOutput (the core's token ids, msgspec structs that cross the
process pipe as msgpack) and RequestOutput (the frontend's, with text), and the finish reasons of both."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec


class FinishReason(str, enum.Enum):
    """Why a request ended. A str enum: `out.finish_reason == "stop"` reads as it always did."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context
    ABORT = "abort"  # aborted by the caller (cancel, hand-back, a consumer that went away)
    ERROR = "error"  # the engine could not serve it: `error` on the output says why

    def __str__(self) -> str:
        return self.value


# array_like: a list on the wire, not a map (256 of them a step); gc=False: they hold no cycles, so the
# collector need not track them.
class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One request's new token ids from one core step, or its end."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    new_logprobs: list[dict[int, float]] | None = None  # per token in new_token_ids, when asked for
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # finish_reason ERROR: what went wrong


# slots: one is built per request per streamed step (256 a step at full batch); cheaper to make and read.
@dataclass(slots=True)
class RequestOutput:
    request_id: str
    token_ids: list[int]  # new tokens (step) or all completion tokens (generate)
    text: str  # new text (step) or the whole completion text (generate); stop strings excluded
    finish_reason: FinishReason | None = None  # set once finished
    logprobs: list[dict[int, float]] | None = None  # per token in token_ids, when asked for
    index: int = 0  # position of token_ids[0] among the completion's tokens
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    extra: dict[str, float] = field(default_factory=dict)  # timings: ttft_s, e2e_s
    error: str | None = None  # finish_reason ERROR: what went wrong ("" when nothing more is known)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
