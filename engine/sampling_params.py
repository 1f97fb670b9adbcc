"""Per-request generation parameters (the `params` object of the wire protocol).

Validated on construction so that a bad value fails at `add_request`, never inside a step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "choice")


@dataclass(frozen=True)
class StructuredOutputParams:
    """The grammar the output must match (engine/structured_output.py compiles it). Frozen and
    hashable: it is the key of the compiled-grammar cache."""

    kind: Literal["json_schema", "json_object", "regex", "choice"]
    # json_schema: the schema as JSON text; regex: the pattern; choice: a JSON array of the strings;
    # json_object: "" (any JSON object).
    spec: str = ""

    def __post_init__(self) -> None:
        _check(self.kind in STRUCTURED_OUTPUT_KINDS,
               f"structured_output.kind must be one of {', '.join(STRUCTURED_OUTPUT_KINDS)}, got {self.kind!r}")
        _check(isinstance(self.spec, str), "structured_output.spec must be a string")
        if self.kind == "choice":
            try:
                choices = json.loads(self.spec)
            except ValueError:
                choices = None
            _check(isinstance(choices, list) and bool(choices) and all(isinstance(c, str) and c for c in choices),
                   "choice must be a non-empty list of non-empty strings")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0  # in [0, 1]
    repetition_penalty: float = 1.0  # > 0; 1 disables (HF semantics: applied to prompt and output tokens)
    presence_penalty: float = 0.0  # in [-2, 2]; OpenAI semantics, output tokens only
    frequency_penalty: float = 0.0  # in [-2, 2]; OpenAI semantics, output tokens only
    seed: int | None = None  # makes the randomness a function of (seed, token position)
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0: only the sampled one)
    n: int = 1  # completions per prompt (engine.generate fans out; each gets its own request id)
    structured_output: StructuredOutputParams | None = None  # a grammar the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool),
               f"max_tokens must be an int, got {self.max_tokens!r}")
        _check(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.temperature >= 0.0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0.0,
               f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0,
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
               f"seed must be a non-negative int or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be a list of non-negative ints")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be None or an int in [0, 20], got {self.logprobs!r}")
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        if isinstance(self.structured_output, dict):  # from a plain-value wire (the engine core's pipe)
            self.structured_output = StructuredOutputParams(**self.structured_output)
        _check(self.structured_output is None or isinstance(self.structured_output, StructuredOutputParams),
               f"structured_output must be StructuredOutputParams or None, got {self.structured_output!r}")
        # A grammar ends with EOS: a request that ignores it would run past the end of its grammar.
        _check(self.structured_output is None or not self.ignore_eos,
               "ignore_eos cannot be combined with a structured output (the grammar ends with EOS)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
