"""Per-head RMSNorm (Qwen3's q_norm/k_norm) and neox-style RoPE on q and k in place, one Triton launch.

cos/sin come from a table built once with the same torch ops as engine/models/layers.RotaryEmbedding,
so the values are bit-identical; the kernel repeats HF's rounding steps in the model dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    tl.store(ptrs1, out1.to(dtype), mask=mask)
    tl.store(ptrs1 + HALF, out2.to(dtype), mask=mask)


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
    HAS_NORM: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
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
        _norm_rope_heads(k_ptr + tok * stride_k_tok, stride_k_head, num_kv_heads, cos, sin,
                         k_norm_weight_ptr, inv_head_dim, eps, HAS_NORM, K_HEADS_PAD, HALF)
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
) -> None:
    """Optional per-head RMSNorm, then neox RoPE (rotate_half), on q and k in place."""
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
    if num_tokens == 0:
        return
    has_norm = q_norm_weight is not None
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
        HAS_NORM=has_norm,
        Q_HEADS_PAD=triton.next_power_of_2(num_heads),
        K_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
        HALF=head_dim // 2,
        num_warps=4,
    )
