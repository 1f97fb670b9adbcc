"""The engine end to end on the GPU path's attention kernels (the interpreter on a CPU host): requests
arriving while others decode make mixed steps, whose leading decode rows go to the decode kernel and
the rest to the prefill kernel (AttentionMetadata.num_decodes through kernels.paged_attention). The
greedy tokens must equal the engine's on the reference attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import engine.attention
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from kernels import paged_attention, write_kv_cache
from tests.helpers.tiny_models import make_tiny_model


def _staggered_run(model_dir: Path, device: torch.device) -> dict[str, list[int]]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=str(device), max_num_seqs=8,
                                    max_num_batched_tokens=24, max_model_len=128, block_size=8,
                                    dtype="float32", enforce_eager=True))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5 + (7 * i + j) % 250 for j in range(11 + 4 * i)] for i in range(5)]
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params, stream=False)
        engine.step()  # the next prompt arrives while this one (and the earlier ones) decode
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.token_ids)
    engine.shutdown()
    return tokens


def test_mixed_steps_on_the_triton_kernels_match_the_reference(tmp_path: Path, device: torch.device,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = make_tiny_model("qwen3", tmp_path / "m")
    reference = _staggered_run(model_dir, device)
    splits: list[tuple[int, int]] = []

    def recording_paged_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        splits.append((kwargs.get("num_decodes", 0), args[4].shape[0]))  # (num_decodes, num_seqs)
        return paged_attention(*args, **kwargs)

    monkeypatch.setattr(engine.attention, "get_attention_ops", lambda device_type: (write_kv_cache,
                                                                                     recording_paged_attention))
    assert _staggered_run(model_dir, device) == reference
    assert len(reference) == 5
    # Some step really was split: decodes first, then at least one prefill chunk.
    assert any(0 < d < n for d, n in splits)
