"""write_kv_cache against write_kv_cache_ref: random slots, padding skipped, strided inputs, dtype
casts, fp8 quantization with per-token scales, and the launcher's argument checks."""

from __future__ import annotations

import pytest
import torch

from kernels import PAD_SLOT_ID, write_kv_cache, write_kv_cache_ref
from kernels.reference import FP8_DTYPE, FP8_MAX, dequantize_fp8_rows


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_fp8_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    key, value, _, _, slots = _random_write(device, 13, 3, 32, 8, 6, dtype, seed=11)
    key = key * torch.logspace(-3, 3, 13, device=device)[:, None, None].to(dtype)  # rows of any magnitude
    shape = (6, 3, 8, 32)
    k_cache = torch.full(shape, 7.0, device=device).to(FP8_DTYPE)
    v_cache = torch.full(shape, 7.0, device=device).to(FP8_DTYPE)
    k_scale = torch.full(shape[:3], 7.0, device=device)
    v_scale = torch.full(shape[:3], 7.0, device=device)
    refs = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    write_kv_cache_ref(key, value, *refs[:2], slots, *refs[2:])
    write_kv_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    torch.testing.assert_close(k_scale, refs[2], rtol=1e-6, atol=0.0)
    torch.testing.assert_close(v_scale, refs[3], rtol=1e-6, atol=0.0)
    for got, want in ((k_cache, refs[0]), (v_cache, refs[1])):
        # Same e4m3 value, but allow one e4m3 step (2**-3 relative, 2**-9 among subnormals) where the
        # GPU's division (not correctly rounded) lands next to a rounding tie.
        diff = (got.float() - want.float()).abs()
        assert (diff <= torch.clamp(want.float().abs() * 2.0**-3, min=2.0**-9)).all()
        assert (diff > 0).float().mean() < 0.01
    # Every written row's largest element is +-448 (its scale maps it there) and reads back within half
    # an e4m3 step of the input (2**-4 relative; 2**-10 of the scale among subnormals); padding tokens
    # left the poisoned slots alone.
    valid = slots != PAD_SLOT_ID
    rows = slots[valid].long()
    flat_k = k_cache.transpose(1, 2).reshape(-1, 3, 32)[rows].float()
    assert torch.equal(flat_k.abs().amax(-1), torch.full_like(flat_k[..., 0], FP8_MAX))
    back = dequantize_fp8_rows(k_cache, k_scale).transpose(1, 2).reshape(-1, 3, 32)[rows]
    row_scale = k_scale.transpose(1, 2).reshape(-1, 3)[rows][..., None]
    exact = key[valid].float()
    assert ((back - exact).abs() <= 1.001 * (exact.abs() * 2.0**-4 + row_scale * 2.0**-10)).all()
    untouched = torch.ones(6 * 8, dtype=torch.bool, device=device)
    untouched[slots[valid].long()] = False
    assert (k_scale.transpose(1, 2).reshape(-1, 3)[untouched] == 7.0).all()


def test_write_fp8_rounds_ties_to_even(device: torch.device) -> None:
    """Every midpoint between neighbouring e4m3 values (and a value just above and below each), in rows
    whose amax is 448 so the scale is exactly 1: the kernel's rounding equals torch's cast."""
    codes = torch.arange(0, 127, dtype=torch.uint8)  # every finite non-negative e4m3 value, 0 to 448
    values = codes.view(FP8_DTYPE).float()
    mids = (values[:-1] + values[1:]) / 2
    probes = torch.cat([mids, torch.nextafter(mids, values[1:]), torch.nextafter(mids, values[:-1])])
    probes = torch.cat([probes, -probes])
    rows = -(-probes.numel() // 31)
    key = torch.zeros(rows * 31)
    key[: probes.numel()] = probes
    key = torch.cat([torch.full((rows, 1), FP8_MAX), key.view(rows, 31)], dim=1)[:, None, :].to(device)
    slots = torch.arange(rows, device=device)
    shape = (-(-rows // 8), 1, 8, 32)
    k_cache = torch.zeros(shape, device=device).to(FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    k_scale = torch.zeros(shape[:3], device=device)
    v_scale = torch.zeros_like(k_scale)
    write_kv_cache(key, key, k_cache, v_cache, slots, k_scale, v_scale)
    got = k_cache.view(-1, 32)[:rows].cpu()
    assert (k_scale.view(-1)[:rows] == 1.0).all()
    # Compared as values: tiny negatives may round to -0 in torch and +0 here, the same number.
    assert torch.equal(got.float(), key[:, 0].cpu().to(FP8_DTYPE).float())


def test_write_fp8_needs_scales(device: torch.device) -> None:
    key, value, k_cache, v_cache, slots = _random_write(device, 4, 2, 32, 8, 2, torch.float32, seed=1)
    k8, v8 = k_cache.to(FP8_DTYPE), v_cache.to(FP8_DTYPE)
    with pytest.raises(ValueError, match="k_scale"):
        write_kv_cache(key, value, k8, v8, slots)
    scale = torch.ones(k_cache.shape[:3], device=device)
    with pytest.raises(ValueError, match="fp8 caches only"):
        write_kv_cache(key, value, k_cache, v_cache, slots, scale, scale)


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
