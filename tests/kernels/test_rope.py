"""Fused per-head RMSNorm + neox RoPE kernel against the torch reference and the engine's RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from engine.models.layers import RMSNorm, RotaryEmbedding, compute_inv_freq
from kernels.reference import qk_norm_rope_ref
from kernels.rope import build_cos_sin_cache, qk_norm_rope

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}  # (atol, rtol)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
         device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the strided views of one fused qkv projection output, like LlamaAttention makes."""
    gen = torch.Generator().manual_seed(num_tokens * 100 + head_dim)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = (torch.randn(num_tokens, width, generator=gen) * 2).to(dtype).to(device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (qkv, q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_norm", [False, True])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_matches_reference(dtype: torch.dtype, has_norm: bool, pos_dtype: torch.dtype,
                           device: torch.device) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 6, 2, 32  # 6 heads: a padded head tile
    _, q, k, v = _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device)
    cache = build_cos_sin_cache(compute_inv_freq(head_dim, 10000.0, None).to(device), 512)
    positions = torch.tensor([0, 7, 511, 3, 130], dtype=pos_dtype, device=device)
    gen = torch.Generator().manual_seed(3)
    q_w = (1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype).to(device) if has_norm else None
    k_w = (1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype).to(device) if has_norm else None
    expected_q, expected_k = qk_norm_rope_ref(q, k, positions, cache, q_w, k_w, 1e-6)
    v_before = v.clone()
    qk_norm_rope(q, k, positions, cache, q_w, k_w, 1e-6)
    _assert_close(q, expected_q, dtype)
    _assert_close(k, expected_k, dtype)
    assert torch.equal(v, v_before), "v (the rest of the qkv row) must be left alone"


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SCALING])
def test_cache_holds_the_engine_cos_sin_bit_for_bit(rope_scaling: dict[str, object] | None) -> None:
    inv_freq = compute_inv_freq(64, 500000.0, rope_scaling)
    cache = build_cos_sin_cache(inv_freq, 300)
    positions = torch.tensor([0, 1, 17, 299])
    freqs = positions[:, None].float() * inv_freq[None, :]  # what RotaryEmbedding.forward computes
    assert torch.equal(cache[positions, :32], freqs.cos())
    assert torch.equal(cache[positions, 32:], freqs.sin())


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SCALING])
def test_matches_engine_qk_norm_and_rotary(rope_scaling: dict[str, object] | None, device: torch.device) -> None:
    """The kernel reproduces LlamaAttention's torch path: q_norm/k_norm modules, then RotaryEmbedding."""
    num_tokens, head_dim = 4, 64
    with torch.device(device):
        rotary = RotaryEmbedding(head_dim, 500000.0, rope_scaling, max_positions=256)
        q_norm, k_norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
    q_norm.weight.data.uniform_(0.5, 1.5)
    k_norm.weight.data.uniform_(0.5, 1.5)
    _, q, k, _ = _qkv(num_tokens, 4, 2, head_dim, torch.float32, device)
    positions = torch.tensor([5, 255, 0, 100], device=device)
    with torch.inference_mode():
        expected_q, expected_k = rotary(positions, q_norm(q), k_norm(k))
        cache = build_cos_sin_cache(rotary.inv_freq, 256)
        qk_norm_rope(q, k, positions, cache, q_norm.weight, k_norm.weight, 1e-6)
    _assert_close(q, expected_q, torch.float32)
    _assert_close(k, expected_k, torch.float32)


def test_rotation_moves_values(device: torch.device) -> None:
    """Position 0 is the identity; any other position rotates pairs (i, i + D/2) and keeps their norm."""
    _, q, k, _ = _qkv(2, 2, 1, 16, torch.float32, device)
    q_before, k_before = q.clone(), k.clone()
    cache = build_cos_sin_cache(compute_inv_freq(16, 10000.0, None).to(device), 8)
    qk_norm_rope(q, k, torch.tensor([0, 3], device=device), cache, None, None, 1e-6)
    torch.testing.assert_close(q[0], q_before[0])
    torch.testing.assert_close(k[0], k_before[0])
    assert not torch.allclose(q[1], q_before[1])
    pair_norm = (q[1, :, :8] ** 2 + q[1, :, 8:] ** 2)
    torch.testing.assert_close(pair_norm, q_before[1, :, :8] ** 2 + q_before[1, :, 8:] ** 2)


def test_bad_arguments_raise(device: torch.device) -> None:
    _, q, k, _ = _qkv(2, 2, 1, 32, torch.float32, device)
    cache = build_cos_sin_cache(compute_inv_freq(32, 10000.0, None).to(device), 8)
    positions = torch.tensor([0, 1], device=device)
    weight = torch.ones(32, device=device)
    with pytest.raises(ValueError, match="both"):
        qk_norm_rope(q, k, positions, cache, weight, None, 1e-6)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(q, k, positions.float(), cache, None, None, 1e-6)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        qk_norm_rope(q, k, positions, cache.to(torch.bfloat16), None, None, 1e-6)
    with pytest.raises(ValueError, match="k must"):
        qk_norm_rope(q, k.to(torch.bfloat16), positions, cache, None, None, 1e-6)
    _, q48, k48, _ = _qkv(2, 2, 1, 48, torch.float32, device)
    with pytest.raises(ValueError, match="power of two"):
        qk_norm_rope(q48, k48, positions, cache, None, None, 1e-6)
