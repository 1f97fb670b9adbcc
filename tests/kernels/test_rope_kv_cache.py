"""The RoPE kernel's fused KV-cache write: the same q/k as the rotate-only launch, and the same cache
bytes (and fp8 scales) as write_kv_cache run after it, with padding tokens' slots left alone."""

from __future__ import annotations

import pytest
import torch

from engine.models.layers import compute_inv_freq
from kernels import PAD_SLOT_ID, write_kv_cache
from kernels.reference import FP8_DTYPE
from kernels.rope import build_cos_sin_cache, qk_norm_rope

POISON = 7.0  # what every cache entry and scale holds before the write


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bytes of x, so equality is byte for byte (NaN, -0 and fp8 included)."""
    return x.contiguous().view(torch.uint8)


def _qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
         device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of one fused qkv output; rows of very different magnitudes, so each
    fp8 row gets its own scale."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv * torch.logspace(-2, 2, num_tokens)[:, None]
    qkv = qkv.to(dtype).to(device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


def _poisoned_cache(shape: tuple[int, int, int, int], cache_dtype: torch.dtype, device: torch.device
                    ) -> list[torch.Tensor]:
    """[k_cache, v_cache] of shape [num_blocks, num_kv_heads, block_size, head_dim] (+ [k_scale,
    v_scale] for fp8), every entry POISON."""
    tensors = [torch.full(shape, POISON, device=device).to(cache_dtype) for _ in range(2)]
    if cache_dtype == FP8_DTYPE:
        tensors += [torch.full(shape[:3], POISON, device=device) for _ in range(2)]
    return tensors


def _check_fused_write(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                       num_blocks: int, dtype: torch.dtype, cache_dtype: torch.dtype, has_norm: bool,
                       device: torch.device, seed: int) -> None:
    """Rotate then write_kv_cache, against one fused launch, on poisoned caches; tokens 1, 6, 11, ...
    and a random quarter of the others (never token 0) are padding."""
    gen = torch.Generator().manual_seed(seed)
    max_positions = 4 * num_tokens
    table = build_cos_sin_cache(compute_inv_freq(head_dim, 10000.0, None).to(device), max_positions)
    positions = torch.randint(0, max_positions, (num_tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    is_pad = torch.rand(num_tokens, generator=gen) < 0.25
    is_pad[1::5] = True
    is_pad[0] = False
    slots = torch.where(is_pad, PAD_SLOT_ID, slots).to(device)
    q_w, k_w = ((1 + 0.3 * torch.randn(2, head_dim, generator=gen)).to(dtype).to(device) if has_norm
                else (None, None))
    is_fp8 = cache_dtype == FP8_DTYPE
    shape = (num_blocks, num_kv_heads, block_size, head_dim)

    q_ref, k_ref, v_ref = _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed)
    cache_ref = _poisoned_cache(shape, cache_dtype, device)
    qk_norm_rope(q_ref, k_ref, positions, table, q_w, k_w, 1e-6)
    write_kv_cache(k_ref, v_ref, cache_ref[0], cache_ref[1], slots, cache_ref[2] if is_fp8 else None,
                   cache_ref[3] if is_fp8 else None)

    q, k, v = _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed)
    v_before = v.clone()
    cache = _poisoned_cache(shape, cache_dtype, device)
    qk_norm_rope(q, k, positions, table, q_w, k_w, 1e-6, value=v, k_cache=cache[0], v_cache=cache[1],
                 slot_mapping=slots, k_scale=cache[2] if is_fp8 else None, v_scale=cache[3] if is_fp8 else None)

    assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(_bits(k), _bits(k_ref))
    assert torch.equal(_bits(v), _bits(v_before)), "v is stored, never changed"
    for got, want in zip(cache, cache_ref, strict=True):
        assert torch.equal(_bits(got), _bits(want))
    # The write happened, and only at the real tokens' slots: every other slot still holds the poison.
    real = slots != PAD_SLOT_ID
    assert 0 < int(real.sum()) < num_tokens
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[real].cpu()] = True
    for tensor in cache:
        rows = tensor.transpose(1, 2).reshape(num_blocks * block_size, -1).float().cpu()  # [slot, ...]
        assert (rows[~written] == POISON).all()
        assert (rows[written] != POISON).any(dim=1).all()
    if cache_dtype == dtype:  # the stored k is the rotated one itself
        k_rows = cache[0].transpose(1, 2).reshape(num_blocks * block_size, num_kv_heads, head_dim)
        assert torch.equal(k_rows[slots[real]], k[real])


CASES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
         (torch.bfloat16, FP8_DTYPE), (torch.float32, FP8_DTYPE)]  # (model dtype, cache dtype)


@pytest.mark.parametrize(("dtype", "cache_dtype"), CASES)
@pytest.mark.parametrize("num_kv_heads", [3, 2])
@pytest.mark.parametrize("has_norm", [False, True])
def test_fused_write_matches_rotate_then_write_kv_cache(dtype: torch.dtype, cache_dtype: torch.dtype,
                                                        num_kv_heads: int, has_norm: bool,
                                                        device: torch.device) -> None:
    # 3 KV heads and 6 q heads: padded head tiles; 11 tokens over 4 blocks of 8.
    _check_fused_write(11, 2 * num_kv_heads, num_kv_heads, 32, 8, 4, dtype, cache_dtype, has_norm, device,
                       seed=num_kv_heads * 10 + has_norm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("num_tokens", [2, 256, 3000])
def test_fused_write_qwen3_shape_on_gpu(num_tokens: int, cache_dtype: torch.dtype) -> None:
    """Qwen3-0.6B's attention shape (16 heads, 8 KV heads, head_dim 128, q/k norm) in bf16, blocks of 16:
    the compiled kernel (fma contraction, fast division) is byte-identical to the two launches too."""
    _check_fused_write(num_tokens, 16, 8, 128, 16, -(-2 * num_tokens // 16), torch.bfloat16, cache_dtype,
                       True, torch.device("cuda"), seed=num_tokens)


def test_all_padding_writes_nothing(device: torch.device) -> None:
    q, k, v = _qkv(3, 2, 1, 16, torch.float32, device, seed=1)
    table = build_cos_sin_cache(compute_inv_freq(16, 10000.0, None).to(device), 8)
    k_cache, v_cache = _poisoned_cache((2, 1, 8, 16), torch.float32, device)
    slots = torch.full((3,), PAD_SLOT_ID, device=device)
    qk_norm_rope(q, k, torch.tensor([0, 1, 2], device=device), table, None, None, 1e-6, value=v,
                 k_cache=k_cache, v_cache=v_cache, slot_mapping=slots)
    assert (k_cache == POISON).all() and (v_cache == POISON).all()


def test_bad_cache_arguments_raise(device: torch.device) -> None:
    q, k, v = _qkv(2, 4, 2, 32, torch.float32, device, seed=2)
    table = build_cos_sin_cache(compute_inv_freq(32, 10000.0, None).to(device), 8)
    positions = torch.tensor([0, 1], device=device)
    slots = torch.tensor([0, 1], device=device)
    k_cache, v_cache = _poisoned_cache((2, 2, 8, 32), torch.float32, device)
    with pytest.raises(ValueError, match="slot_mapping"):  # a partial set of cache arguments
        qk_norm_rope(q, k, positions, table, None, None, 1e-6, value=v, k_cache=k_cache, v_cache=v_cache)
    with pytest.raises(ValueError, match="slot_mapping"):
        qk_norm_rope(q, k, positions, table, None, None, 1e-6, value=v, k_cache=k_cache, v_cache=v_cache,
                     slot_mapping=slots.float())
    with pytest.raises(ValueError, match="shape"):  # the cache has one KV head, k two
        qk_norm_rope(q, k, positions, table, None, None, 1e-6, value=v, k_cache=k_cache[:, :1].contiguous(),
                     v_cache=v_cache[:, :1].contiguous(), slot_mapping=slots)
    k8, v8 = k_cache.to(FP8_DTYPE), v_cache.to(FP8_DTYPE)
    with pytest.raises(ValueError, match="k_scale"):
        qk_norm_rope(q, k, positions, table, None, None, 1e-6, value=v, k_cache=k8, v_cache=v8,
                     slot_mapping=slots)
    with pytest.raises(ValueError, match="dtype"):
        qk_norm_rope(q, k, positions, table, None, None, 1e-6, value=v.to(torch.bfloat16), k_cache=k_cache,
                     v_cache=v_cache, slot_mapping=slots)
