"""Per-head RMSNorm (Qwen3's q_norm/k_norm) and neox-style RoPE on q and k in place, one Triton launch.

cos/sin come from a table built once with the same torch ops as engine/models/layers.RotaryEmbedding,
so the values are bit-identical; the kernel repeats HF's rounding steps in the model dtype. Given the
paged cache and slot_mapping, the same launch also stores the rotated k and the untouched v there,
bit-identical to kernels/kv_cache.write_kv_cache (which the attention layer then skips)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import (
    check_kv_cache,
    check_rows,
    check_slot_mapping,
    fp8_row_scale,
    quantize_e4m3,
    scale_args,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports_head_dim(head_dim: int) -> bool:
    """Power-of-two head dims keep each half a power-of-two tile (tl.arange needs one)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each position's angles in the first half, sin in the second.

    Same ops as RotaryEmbedding.forward (positions as fp32 times inv_freq, then cos/sin in fp32) on
    the same device, so each entry equals what the per-step computation gives for that position."""
    positions = torch.arange(max_positions, dtype=torch.int64, device=inv_freq.device)
    freqs = positions[:, None].float() * inv_freq[None, :]  # [max_positions, head_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


@triton.jit
def _norm_rope_heads(
    x_ptr,  # [head_dim] of head 0 of this token; heads follow at stride_head
    stride_head,
    num_heads,
    cos,  # [1, HALF] fp32, already rounded to the model dtype
    sin,  # [1, HALF] fp32, already rounded to the model dtype
    norm_weight_ptr,  # [head_dim]
    inv_head_dim,
    eps,
    HAS_NORM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < num_heads)[:, None]
    ptrs1 = x_ptr + offs_h[:, None] * stride_head + offs_d[None, :]  # first half of each head
    x1 = tl.load(ptrs1, mask=mask, other=0.0)  # [HEADS_PAD, HALF]
    x2 = tl.load(ptrs1 + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    if HAS_NORM:
        variance = (tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) * inv_head_dim
        rstd = tl.math.rsqrt(variance + eps)[:, None]
        w1 = tl.load(norm_weight_ptr + offs_d).to(tl.float32)[None, :]
        w2 = tl.load(norm_weight_ptr + HALF + offs_d).to(tl.float32)[None, :]
        # HF: weight * (x * rstd).to(dtype), each product rounded to the model dtype.
        a1 = (w1 * (a1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        a2 = (w2 * (a2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # q * cos + rotate_half(q) * sin with rotate_half(q) = (-x2, x1); every product and the sum are
    # rounded to the model dtype as torch does (no-ops in fp32).
    out1 = (a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)
    out2 = (a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)
    out1 = out1.to(dtype)
    out2 = out2.to(dtype)
    tl.store(ptrs1, out1, mask=mask)
    tl.store(ptrs1 + HALF, out2, mask=mask)
    return out1, out2  # what was stored, for the cache write


@triton.jit
def _store_cache_rows(
    cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    dst,  # [HEADS_PAD, 1] int64: offset of each head's row of this token's slot
    x1,  # [HEADS_PAD, HALF] in the model dtype: first half of each head's row
    x2,  # [HEADS_PAD, HALF]: second half
    scale_ptr,  # [num_blocks, num_kv_heads, block_size] fp32 (written only when IS_FP8)
    scale_dst,  # [HEADS_PAD] int64
    head_mask,  # [HEADS_PAD]
    HALF: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    """What _write_kv_cache_kernel stores for one (token, head) row, from the row's two halves."""
    offs_d = tl.arange(0, HALF)[None, :]
    if IS_FP8:
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        # The row's amax is the larger of its halves' (max is exact), so the scale equals write_kv_cache's.
        scale = fp8_row_scale(tl.maximum(tl.max(tl.abs(a1), axis=1), tl.max(tl.abs(a2), axis=1)))
        tl.store(scale_ptr + scale_dst, scale, mask=head_mask)
        y1 = quantize_e4m3(a1, scale)
        y2 = quantize_e4m3(a2, scale)
    else:
        y1 = x1
        y2 = x2
    mask = head_mask[:, None]
    tl.store(cache_ptr + dst + offs_d, y1.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + dst + HALF + offs_d, y2.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim], updated in place
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], updated in place
    positions_ptr,  # [num_tokens] int
    cos_sin_ptr,  # [max_positions, head_dim] fp32: cos | sin
    q_norm_weight_ptr,  # [head_dim] (unused when HAS_NORM is False)
    k_norm_weight_ptr,  # [head_dim] (unused when HAS_NORM is False)
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_pos,
    stride_cache_pos,
    num_heads,
    num_kv_heads,
    max_positions,
    inv_head_dim,
    eps,
    # The paged-cache write (read only when WRITE_CACHE): what write_kv_cache takes.
    v_ptr,  # [num_tokens, num_kv_heads, head_dim], read only
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    slot_mapping_ptr,  # [num_tokens] int, PAD_SLOT_ID for padding
    k_scale_ptr,  # [num_blocks, num_kv_heads, block_size] fp32 (written only when IS_FP8)
    v_scale_ptr,
    stride_v_tok,
    stride_v_head,
    stride_kv_block,
    stride_kv_head,
    stride_kv_tok,
    stride_scale_block,
    stride_scale_head,
    HAS_NORM: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
    WRITE_CACHE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)  # 64-bit: tok * stride_q_tok passes 2**31 in long prefills
    is_key = tl.program_id(1) == 1  # program (t, 0) rotates q's heads, (t, 1) k's heads
    pos = tl.load(positions_ptr + tok * stride_pos).to(tl.int64)
    # A position past the table would read out of bounds: the engine keeps positions < max_model_len
    # <= max_position_embeddings, so this clamp only guards memory, never changes a valid result.
    pos = tl.minimum(tl.maximum(pos, 0), max_positions - 1)
    offs_d = tl.arange(0, HALF)
    cache_row = cos_sin_ptr + pos * stride_cache_pos
    dtype = q_ptr.dtype.element_ty  # k shares it (checked by the launcher)
    # HF casts cos/sin to the model dtype before multiplying.
    cos = tl.load(cache_row + offs_d).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(cache_row + HALF + offs_d).to(dtype).to(tl.float32)[None, :]
    if is_key:
        k1, k2 = _norm_rope_heads(k_ptr + tok * stride_k_tok, stride_k_head, num_kv_heads, cos, sin,
                                  k_norm_weight_ptr, inv_head_dim, eps, HAS_NORM, K_HEADS_PAD, HALF)
        if WRITE_CACHE:
            # k and v go to the cache from this program: with v's rows it moves about what q's does.
            slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
            if slot >= 0:  # PAD_SLOT_ID: a padding token owns no slot
                block = slot // BLOCK_SIZE
                offset = slot % BLOCK_SIZE
                offs_h = tl.arange(0, K_HEADS_PAD)
                head_mask = offs_h < num_kv_heads
                # 64-bit: block * stride_kv_block passes 2**31 elements in a large pool.
                dst = (block * stride_kv_block + offset * stride_kv_tok + offs_h * stride_kv_head)[:, None]
                scale_dst = block * stride_scale_block + offs_h * stride_scale_head + offset
                _store_cache_rows(k_cache_ptr, dst, k1, k2, k_scale_ptr, scale_dst, head_mask, HALF, IS_FP8)
                v_row = v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :]
                v1 = tl.load(v_row, mask=head_mask[:, None], other=0.0)
                v2 = tl.load(v_row + HALF, mask=head_mask[:, None], other=0.0)
                _store_cache_rows(v_cache_ptr, dst, v1, v2, v_scale_ptr, scale_dst, head_mask, HALF, IS_FP8)
    else:
        _norm_rope_heads(q_ptr + tok * stride_q_tok, stride_q_head, num_heads, cos, sin,
                         q_norm_weight_ptr, inv_head_dim, eps, HAS_NORM, Q_HEADS_PAD, HALF)


def _check_heads(name: str, x: torch.Tensor, num_tokens: int, head_dim: int, like: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[0] != num_tokens or x.shape[2] != head_dim:
        raise ValueError(f"{name} must be [{num_tokens}, heads, {head_dim}]; got {tuple(x.shape)}")
    if x.dtype != like.dtype or x.device != like.device:
        raise ValueError(f"{name} must share q's dtype and device ({like.dtype}, {like.device}); got "
                         f"{x.dtype}, {x.device}")
    if x.numel() > 0 and x.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous along head_dim (stride 1); call .contiguous() first")


def qk_norm_rope(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32 (build_cos_sin_cache)
    q_norm_weight: torch.Tensor | None,  # [head_dim]: Qwen3's per-head RMSNorm of q, or None
    k_norm_weight: torch.Tensor | None,  # [head_dim], given exactly when q_norm_weight is
    eps: float,
    *,
    value: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]: v, stored as it is
    k_cache: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size, head_dim]
    slot_mapping: torch.Tensor | None = None,  # [num_tokens] int, PAD_SLOT_ID for padding
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    """Optional per-head RMSNorm, then neox RoPE (rotate_half), on q and k in place. Given value, the
    caches and slot_mapping, also stores the rotated k and value at each token's slot, exactly as
    write_kv_cache(k, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) would after this call."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim]; got {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q must be fp16, bf16 or fp32; got {q.dtype}")
    if not supports_head_dim(head_dim):
        raise ValueError(f"head_dim must be a power of two in [16, 256]; got {head_dim} (use the torch path)")
    _check_heads("q", q, num_tokens, head_dim, q)
    _check_heads("k", k, num_tokens, head_dim, q)
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an int32/int64 [{num_tokens}] tensor; got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if (cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32
            or cos_sin_cache.stride(1) != 1):
        raise ValueError(f"cos_sin_cache must be a fp32 [max_positions, {head_dim}] table from "
                         f"build_cos_sin_cache; got {cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q_norm_weight and k_norm_weight (Qwen3) or neither")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and (w.shape != (head_dim,) or not w.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{head_dim}] tensor; got {tuple(w.shape)}")
    for name, t in (("positions", positions), ("cos_sin_cache", cos_sin_cache),
                    ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q on {q.device}")
    write_cache, block_size = False, 1
    if value is not None and k_cache is not None and v_cache is not None and slot_mapping is not None:
        write_cache = True
        _, num_kv_heads, block_size, cache_head_dim = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
        check_rows("k", k, (num_tokens, num_kv_heads, cache_head_dim), k_cache.device)
        check_rows("value", value, (num_tokens, num_kv_heads, cache_head_dim), k_cache.device)
        if value.dtype != q.dtype:
            raise ValueError(f"value must share q's dtype ({q.dtype}); got {value.dtype}")
        check_slot_mapping(slot_mapping, num_tokens, k_cache.device)
    elif any(t is not None for t in (value, k_cache, v_cache, slot_mapping, k_scale, v_scale)):
        raise ValueError("to write the KV cache pass value, k_cache, v_cache and slot_mapping (and the "
                         "scales of an fp8 cache); pass none of them to only rotate")
    if num_tokens == 0:
        return
    has_norm = q_norm_weight is not None
    # Without a cache write the cache pointers are never read; k stands in for them (one signature).
    v_arg = value if value is not None else k
    k_cache_arg = k_cache if k_cache is not None else k
    v_cache_arg = v_cache if v_cache is not None else k
    k_scale_arg, v_scale_arg, is_fp8 = scale_args(k_cache_arg, k_scale, v_scale)
    _qk_norm_rope_kernel[(num_tokens, 2)](
        q_ptr=q,
        k_ptr=k,
        positions_ptr=positions,
        cos_sin_ptr=cos_sin_cache,
        q_norm_weight_ptr=q_norm_weight if has_norm else cos_sin_cache,
        k_norm_weight_ptr=k_norm_weight if has_norm else cos_sin_cache,
        stride_q_tok=q.stride(0),
        stride_q_head=q.stride(1),
        stride_k_tok=k.stride(0),
        stride_k_head=k.stride(1),
        stride_pos=positions.stride(0),
        stride_cache_pos=cos_sin_cache.stride(0),
        num_heads=num_heads,
        num_kv_heads=k.shape[1],
        max_positions=cos_sin_cache.shape[0],
        inv_head_dim=1.0 / head_dim,
        eps=eps,
        v_ptr=v_arg,
        k_cache_ptr=k_cache_arg,
        v_cache_ptr=v_cache_arg,
        slot_mapping_ptr=slot_mapping if slot_mapping is not None else positions,
        k_scale_ptr=k_scale_arg,
        v_scale_ptr=v_scale_arg,
        stride_v_tok=v_arg.stride(0),
        stride_v_head=v_arg.stride(1),
        stride_kv_block=k_cache_arg.stride(0),
        stride_kv_head=k_cache_arg.stride(1),
        stride_kv_tok=k_cache_arg.stride(2),
        stride_scale_block=k_scale_arg.stride(0),
        stride_scale_head=k_scale_arg.stride(1),
        HAS_NORM=has_norm,
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF=head_dim // 2,
        WRITE_CACHE=write_cache,
        BLOCK_SIZE=block_size,
        IS_FP8=is_fp8,
        num_warps=4,
    )
