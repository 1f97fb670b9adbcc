"""RequestOutput: what the engine hands back per request and step (a delta) or at the end (whole)."""

from __future__ import annotations

from dataclasses import dataclass, field


# slots: one is built per request per step (256 a step at full batch); they are cheaper to make and read.
@dataclass(slots=True)
class RequestOutput:
    request_id: str
    token_ids: list[int]  # new tokens (step) or all completion tokens (generate)
    text: str  # new text (step) or the whole completion text (generate); stop strings excluded
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    logprobs: list[dict[int, float]] | None = None  # per token in token_ids, when asked for
    index: int = 0  # position of token_ids[0] among the completion's tokens
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    extra: dict[str, float] = field(default_factory=dict)  # timings: ttft_s, etc.

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
