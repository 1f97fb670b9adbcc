"""write_kv_cache against write_kv_cache_ref: random slots, padding skipped, strided inputs, dtype
casts, and the launcher's argument checks."""

from __future__ import annotations

import pytest
import torch

from kernels import PAD_SLOT_ID, write_kv_cache, write_kv_cache_ref


def _random_write(
    device: torch.device,
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    # A fused qkv projection hands K and V over as strided views: the kernel must honour the strides.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[: num_tokens // 4]] = PAD_SLOT_ID
    return key, value, k_cache, v_cache, slots.to(device)


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("num_kv_heads", [1, 3])
def test_write_matches_reference(
    device: torch.device, block_size: int, head_dim: int, num_kv_heads: int
) -> None:
    key, value, k_cache, v_cache, slots = _random_write(
        device,
        13,
        num_kv_heads,
        head_dim,
        block_size,
        6,
        torch.float32,
        seed=block_size + head_dim + num_kv_heads,
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)
    # The write did something: every non-padding token's key landed at its slot.
    valid = slots != PAD_SLOT_ID
    flat = k_cache.transpose(1, 2).reshape(-1, num_kv_heads, head_dim)
    assert torch.equal(flat[slots[valid].long()], key[valid])


def test_write_casts_to_cache_dtype(device: torch.device) -> None:
    key, value, k_cache, v_cache, slots = _random_write(device, 9, 2, 32, 16, 3, torch.float32, seed=7)
    k_cache, v_cache = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    # The GPU rounds to nearest like torch; the interpreter truncates, so allow it one bf16 ulp.
    ulp = 0.0 if device.type == "cuda" else 2.0**-7
    torch.testing.assert_close(k_cache, k_ref, rtol=ulp, atol=0.0)
    torch.testing.assert_close(v_cache, v_ref, rtol=ulp, atol=0.0)


def test_write_all_padding_leaves_cache_untouched(device: torch.device) -> None:
    key, value, k_cache, v_cache, _ = _random_write(device, 5, 2, 32, 8, 2, torch.float32, seed=3)
    before = k_cache.clone()
    slots = torch.full((5,), PAD_SLOT_ID, dtype=torch.int64, device=device)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, before)


def test_write_rejects_bad_arguments(device: torch.device) -> None:
    key, value, k_cache, v_cache, slots = _random_write(device, 4, 2, 32, 8, 2, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"num_kv_heads|shape"):
        write_kv_cache(key[:, :1], value[:, :1], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="contiguous"):
        write_kv_cache(key, value, k_cache.transpose(1, 2), v_cache.transpose(1, 2), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, value, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match="head_dim"):
        write_kv_cache(
            key[..., :24],
            value[..., :24],
            k_cache[..., :24].contiguous(),
            v_cache[..., :24].contiguous(),
            slots,
        )
