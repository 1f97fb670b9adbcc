"""Request: the per-request state the scheduler owns (tokens, progress, status).

The block table lives in the KV cache manager and the text in the detokenizer: one owner each."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import msgspec

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its KV freed; recomputed when rescheduled
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()  # from the checkpoint; ignored when params.ignore_eos
    priority: int = 0  # lower runs first (policy "priority")
    # The job's lane (api_client.keys.LANES index; 0 = interactive): ranks above priority in every
    # policy, and a request of a higher lane may preempt a running one of a lower lane.
    lane_rank: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    seed: int = 0  # resolved seed: params.seed, or one the engine drew for an unseeded request
    # Tokens generated so far. Non-empty at construction when a job is resumed (another worker died):
    # generation continues after them exactly as it would have.
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # Tokens scheduled in a launched step whose output the scheduler has not seen yet (async scheduling);
    # num_computed_tokens catches up in update_from_output.
    num_inflight_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 until scheduled (stats only)
    num_preemptions: int = 0
    # prompt + outputs, kept as one list because the model runner and the prefix hash read it whole.
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty")
        self.all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


class EngineCoreRequest(msgspec.Struct, array_like=True, tag=0, gc=False):
    """A validated Request on its way to an engine core in another process (what the scheduler needs;
    its progress fields start fresh there)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # a dataclass to msgspec: rebuilt field by field, then validated again
    eos_token_ids: list[int]
    priority: int
    seed: int
    output_token_ids: list[int]
    lane_rank: int = 0

    @classmethod
    def from_request(cls, r: Request) -> EngineCoreRequest:
        return cls(r.request_id, r.prompt_token_ids, r.sampling_params, sorted(r.eos_token_ids), r.priority,
                   r.seed, r.output_token_ids, r.lane_rank)

    def to_request(self) -> Request:
        return Request(request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                       sampling_params=self.sampling_params,
                       eos_token_ids=frozenset(self.eos_token_ids), priority=self.priority, seed=self.seed,
                       output_token_ids=self.output_token_ids, lane_rank=self.lane_rank)
