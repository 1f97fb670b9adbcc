"""The contract between scheduler, model runner and engine: plain Python values, no tensors.

The runner keeps a persistent per-request state (token ids, block table row) keyed by request id;
the scheduler sends a request's full data once (NewRequestData) and only what changed afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen, or one resumed after preemption (its old state was dropped)."""

    req_id: str
    token_ids: list[int]  # every token known so far: prompt, then outputs (when resumed or preempted)
    num_prompt_tokens: int  # token_ids[num_prompt_tokens:] are outputs (penalties count those)
    block_ids: list[int]  # the whole block table at this step
    num_computed_tokens: int  # tokens whose KV is already cached (prefix hit), before this step
    sampling_params: SamplingParams
    seed: int  # resolved seed: the sampler's randomness is a function of (seed, token position)


@dataclass
class CachedRequestData:
    """A request the runner already holds; its new tokens are the ones the runner sampled itself."""

    req_id: str
    new_block_ids: list[int]  # appended to its block table (may be empty)
    num_computed_tokens: int  # tokens whose KV is cached, before this step


@dataclass
class SchedulerOutput:
    # Requests first scheduled (or rescheduled after preemption) this step.
    new_requests: list[NewRequestData] = field(default_factory=list)
    # Requests scheduled this step that the runner already holds.
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # req_id -> tokens to compute this step, in batch order (decodes first, then prefill chunks).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Sum of num_scheduled_tokens, <= max_num_batched_tokens.
    total_num_scheduled_tokens: int = 0
    # Requests finished, aborted or preempted since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted this step (a subset of finished_req_ids as far as the runner is concerned).
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    # req_id -> the token sampled this step, for each request whose scheduled tokens reached the end of
    # its known tokens (a finished prefill or a decode). Partial prefill chunks sample nothing.
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    # req_id -> {token_id: logprob} holding the sampled token and the top-`logprobs` tokens, for
    # requests that asked for logprobs.
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
