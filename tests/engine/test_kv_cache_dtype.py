"""kv_cache_dtype="fp8" end to end on the CPU: greedy output equals HF transformers whose attention
reads K/V through the same fp8 rounding (e4m3, one scale per token and KV head), the cache really is
fp8, and the pool holds as many more blocks as the smaller element allows."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from kernels.reference import FP8_DTYPE, dequantize_fp8_rows, quantize_fp8_rows

FP8_ATTENTION = "tokenrelay_fp8_kv"


def _fake_quantized_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         *args: Any, **kwargs: Any) -> Any:
    """HF's sdpa attention over K/V [B, H_kv, S, D] rounded through fp8 row by row, as our cache
    stores them (HF keeps the exact values in its own cache, so each row is quantized from them)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key = dequantize_fp8_rows(*quantize_fp8_rows(key)).to(key.dtype)
    value = dequantize_fp8_rows(*quantize_fp8_rows(value)).to(value.dtype)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def _hf_fp8_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register(FP8_ATTENTION, _fake_quantized_sdpa)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=FP8_ATTENTION).eval()
    outs = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        outs.append(out[0, len(ids):].tolist())
    return outs


def _prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fp8_greedy_matches_hf_with_fp8_rounded_kv(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs[arch]
    # Small blocks and a small token budget: prompts span several blocks and arrive in chunks.
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128, block_size=8, max_num_seqs=4,
                                    max_num_batched_tokens=24, kv_cache_dtype="fp8"))
    cache = engine.model_runner.kv_cache
    assert cache is not None and cache.dtype == FP8_DTYPE
    prompts = _prompts(engine.vocab_size, [3, 17, 40, 9, 30, 1], seed=2)
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == _hf_fp8_greedy(model_dir, prompts, 12)
    # The fp8 rounding is live: the same tokens' logprobs differ from those over an exact cache.
    exact = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128, block_size=8, max_num_seqs=4,
                                   max_num_batched_tokens=24))
    exact_outs = exact.generate(prompts, params)
    diffs = [abs(a[t] - b[t]) for o, e in zip(outs, exact_outs, strict=True) if o.token_ids == e.token_ids
             for a, b, t in zip(o.logprobs or [], e.logprobs or [], o.token_ids, strict=True)]
    assert diffs and max(diffs) > 1e-4


def test_fp8_pool_holds_more_blocks(tiny_model_dir: Path) -> None:
    """The CPU pool is sized from cpu_kv_cache_gb: fp8 (1 byte + a 4-byte scale per head_dim values)
    against the fp32 model dtype's 4 bytes per value."""
    engines = {dtype: LLMEngine(EngineConfig(model=str(tiny_model_dir), cpu_kv_cache_gb=0.01,
                                             kv_cache_dtype=dtype))  # type: ignore[arg-type]
               for dtype in ("auto", "fp8")}
    runner = engines["fp8"].model_runner
    head_dim = runner.head_dim
    expected = 4 * head_dim / (head_dim + 4)
    ratio = engines["fp8"].num_kv_blocks / engines["auto"].num_kv_blocks
    assert ratio == pytest.approx(expected, rel=0.01)
    scales = runner.kv_scales
    assert scales is not None and scales.shape == (runner.num_layers, 2, engines["fp8"].num_kv_blocks,
                                                   runner.num_kv_heads, runner.block_size)


def test_unknown_kv_cache_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(model="m", kv_cache_dtype="int8")  # type: ignore[arg-type]
