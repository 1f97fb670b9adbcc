"""Plain-torch references for the paged KV cache: the CPU attention path and the Triton kernels' oracle.

Cache layout (per layer): k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim], so one
block of one KV head is contiguous. Slot s lives at block s // block_size, offset s % block_size.

FP8 cache (float8_e4m3fn): each (token, KV head) row of head_dim values is stored as e4m3 with its own
float32 scale, amax(|row|) / 448, in k_scale / v_scale [num_blocks, num_kv_heads, block_size]; the
value read back is fp8 * scale. Per-row scales need no calibration and no outlier can saturate them."""

from __future__ import annotations

import torch

PAD_SLOT_ID = -1  # slot_mapping entry for a padding token: its K/V are not written
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# Floor of a row's amax, so an all-zero row gets a finite scale (its values quantize to 0 anyway).
FP8_MIN_AMAX = 1e-12


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (e4m3 values [..., head_dim], float32 scales [...]), per last-dim row; the
    kernels compute the same in float32 (amax / 448, then x / scale rounded to nearest even)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1).clamp(min=FP8_MIN_AMAX) / FP8_MAX
    q = (x32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(e4m3 [..., head_dim], float32 [...]) -> float32 [..., head_dim]."""
    return q.float() * scale[..., None]


def write_kv_cache_ref(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, PAD_SLOT_ID for padding
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    block_size = k_cache.shape[2]
    valid = slot_mapping != PAD_SLOT_ID
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    if k_cache.dtype == FP8_DTYPE:
        assert k_scale is not None and v_scale is not None, "an fp8 cache needs k_scale and v_scale"
        for src, cache, scales in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
            q, scale = quantize_fp8_rows(src[valid])  # [n, H_kv, D], [n, H_kv]
            cache[blocks, :, offsets] = q
            scales[blocks, :, offsets] = scale
        return
    k_cache[blocks, :, offsets] = key[valid].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value[valid].to(v_cache.dtype)


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]; each sequence's tokens are its last ones
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int: cu_seqlens_q
    scale: float,
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole cached context (prefill,
    chunked prefill / prefix-hit extend, and decode alike), in float32 (an fp8 cache dequantized)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        table = block_tables[i, :num_blocks].long()
        # [num_blocks, H_kv, bs, D] -> [H_kv, num_blocks * bs, D] -> first seq_len tokens
        if k_cache.dtype == FP8_DTYPE:
            assert k_scale is not None and v_scale is not None, "an fp8 cache needs k_scale and v_scale"
            k_blocks = dequantize_fp8_rows(k_cache[table], k_scale[table])
            v_blocks = dequantize_fp8_rows(v_cache[table], v_scale[table])
        else:
            k_blocks, v_blocks = k_cache[table].float(), v_cache[table].float()
        k = k_blocks.transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]
        v = v_blocks.transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :seq_len]
        k = k.repeat_interleave(group, dim=0)  # [H, S, D]
        v = v.repeat_interleave(group, dim=0)
        q = query[q_start:q_end].float().transpose(0, 1)  # [H, q_len, D]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, q_len, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] > q_pos[:, None]  # [q_len, S]
        scores.masked_fill_(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out


# References of the fused norm / RoPE / activation kernels: HF's op order in plain torch.


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., hidden]
    """HF LlamaRMSNorm: normalise in fp32, cast to the input dtype, then scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, residual + x)
    residual_out = residual + x  # HF: hidden_states = residual + hidden_states, in the model dtype
    return rms_norm_ref(residual_out, weight, eps), residual_out


def qk_norm_rope_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] fp32: cos | sin of each position's angles
    q_norm_weight: torch.Tensor | None,  # [head_dim]
    k_norm_weight: torch.Tensor | None,  # [head_dim]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # new (q, k); the inputs are left untouched
    if q_norm_weight is not None and k_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    half = q.shape[-1] // 2
    rows = cos_sin_cache[positions.long()]  # [T, head_dim]
    cos = torch.cat((rows[:, :half], rows[:, :half]), dim=-1).to(q.dtype)[:, None, :]  # [T, 1, D]
    sin = torch.cat((rows[:, half:], rows[:, half:]), dim=-1).to(q.dtype)[:, None, :]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
