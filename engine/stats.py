"""EngineStats: a snapshot of the engine's load, safe to hand to another thread or process."""

from __future__ import annotations

import msgspec


class EngineStats(msgspec.Struct, frozen=True, array_like=True, gc=False):
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float  # used blocks / total blocks
    prefix_cache_hit_rate: float  # prompt tokens served from cache / prompt tokens scheduled
    num_preemptions: int  # total since start
    num_generated_tokens: int  # total since start
    num_steps: int  # total since start
    max_num_seqs: int
