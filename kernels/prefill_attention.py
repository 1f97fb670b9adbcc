"""Prefill / extend attention over the paged KV cache: variable query lengths per sequence
(cu_seqlens_q), causal over the whole cached context, so chunked prefill and prefix hits just work.
An fp8 cache is dequantized in registers, as in the decode kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.kv_cache import check_attention_args, dot_in_fp32, load_kv_tile, pipeline_stages, scale_args

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, HEAD_DIM]
    m_i,  # [BLOCK_M] running max (log2 domain)
    l_i,  # [BLOCK_M] running sum
    acc,  # [BLOCK_M, HEAD_DIM] fp32, unnormalised
    start_n,
    kv_end,
    q_pos,  # [BLOCK_M] position of each row's token in its sequence
    k_cache_ptr,
    v_cache_ptr,
    block_table_row,
    head_offset,
    offs_d,
    stride_cache_block,
    stride_cache_tok,
    k_scale_ptr,
    v_scale_ptr,
    scale_head_offset,
    stride_scale_block,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    IS_FP8: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the tile is visible to every row (no compare, no where)
):
    """One K/V tile of the online softmax."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < kv_end
    k, v, k_s, v_s = load_kv_tile(
        k_cache_ptr, v_cache_ptr, block_table_row, head_offset, offs_n, mask_n, offs_d,
        stride_cache_block, stride_cache_tok, k_scale_ptr, v_scale_ptr, scale_head_offset,
        stride_scale_block, BLOCK_SIZE, UPCAST, IS_FP8)  # [BLOCK_N, HEAD_DIM], [BLOCK_N]
    if IS_FP8:  # e4m3 -> the query's dtype is exact
        k, v = k.to(q.dtype), v.to(q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if IS_FP8:
        qk = qk * k_s[None, :]  # dequantize K per token
    qk = qk * qk_scale
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    # Key 0 is visible to every row, so m_i is finite after the first tile and no row sees NaN.
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IS_FP8:
        p = p * v_s[None, :]  # dequantize V per token
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# seq_offset takes any value from step to step: specialising on it (== 1, % 16) would compile new
# variants in the middle of serving.
@triton.jit(do_not_specialize=["seq_offset"])
def _prefill_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables_ptr,  # [num_seqs, max_num_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    k_scale_ptr,  # [num_blocks, num_kv_heads, block_size] fp32 (fp8 caches only)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in exp2
    seq_offset,  # program 0 serves sequence seq_offset (the leading ones are another kernel's)
    stride_q_tok,
    stride_q_head,
    stride_cache_block,
    stride_cache_head,
    stride_cache_tok,
    stride_scale_block,
    stride_scale_head,
    stride_bt_seq,
    stride_out_tok,
    stride_out_head,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per program; rows = BLOCK_Q * GROUP_PAD
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # compute in fp32: the interpreter's bf16 tl.dot is wrong (triton 3.9)
    IS_FP8: tl.constexpr,
    CAUSAL_SPLIT: tl.constexpr,  # mask only the tiles the diagonal crosses; heaviest query tiles first
):
    seq = tl.program_id(0) + seq_offset
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if CAUSAL_SPLIT:
        # The last query tile sees the most keys: launch it first, so long tiles do not trail the grid.
        q_tile = tl.cdiv(q_len, BLOCK_Q) - 1 - tl.program_id(1)
        if q_tile < 0:  # the grid is sized for the longest query
            return
    else:
        q_tile = tl.program_id(1)
    tile_start = q_tile * BLOCK_Q
    if tile_start >= q_len:  # the grid is sized for the longest query
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens cached before this step's: visible to every new token

    # Row r is query token tile_start + r // GROUP_PAD, head r % GROUP_PAD of this KV group, so the
    # K/V tile loaded once serves the whole group.
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_tok = tile_start + offs_m // GROUP_PAD
    in_group = offs_m % GROUP_PAD
    mask_m = (q_tok < q_len) & (in_group < GROUP)
    heads = kv_head * GROUP + in_group
    offs_d = tl.arange(0, HEAD_DIM)
    tokens = (q_start + q_tok).to(tl.int64)
    q_offs = tokens[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(query_ptr + q_offs, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = context_len + q_tok  # position of each row's token in its sequence

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head.to(tl.int64) * stride_cache_head
    scale_head_offset = kv_head.to(tl.int64) * stride_scale_head
    kv_end = tl.minimum(seq_len, context_len + tile_start + BLOCK_Q)  # causal: nothing past the last row
    if CAUSAL_SPLIT:
        # Keys up to the tile's first token are visible to every row: whole tiles of them need no mask.
        masked_start = ((context_len + tile_start + 1) // BLOCK_N) * BLOCK_N
        for start_n in range(0, masked_start, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start_n, kv_end, q_pos, k_cache_ptr, v_cache_ptr, block_table_row,
                head_offset, offs_d, stride_cache_block, stride_cache_tok, k_scale_ptr, v_scale_ptr,
                scale_head_offset, stride_scale_block, qk_scale, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST, IS_FP8,
                False)
    else:
        masked_start = 0
    for start_n in range(masked_start, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start_n, kv_end, q_pos, k_cache_ptr, v_cache_ptr, block_table_row,
            head_offset, offs_d, stride_cache_block, stride_cache_tok, k_scale_ptr, v_scale_ptr,
            scale_head_offset, stride_scale_block, qk_scale, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST, IS_FP8,
            True)

    out = acc / l_i[:, None]
    o_offs = tokens[:, None] * stride_out_tok + heads[:, None] * stride_out_head + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@dataclass(frozen=True)
class PrefillConfig:
    """Tile and loop shape of the prefill kernel (bench/kernels.py sweeps these)."""

    rows_per_tile: int = 64  # query rows (tokens x heads of one KV group) per program
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Run the fully visible K/V tiles without the causal mask (only the diagonal's tiles pay for the
    # compare and select) and launch each sequence's heaviest query tiles first: 237 -> 288 TFLOP/s at
    # 4 x 2048 and 254 -> 315 at 2 x 4096 on an H200 (BENCHMARKS.md).
    causal_split: bool = True


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
    seq_offset: int = 0,  # attend only for sequences seq_offset.. (the leading ones are left alone)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens (its last ones) over its cached context; the
    K/V of this step's tokens must already be in the cache. max_query_len is a host upper bound of
    the query lengths of the sequences attended (it sizes the grid).

    seq_offset, rather than sliced tensors, skips sequences: a slice moves the data pointers off
    16-byte alignment by a different amount at every split point, and Triton compiles a kernel per
    alignment it sees."""
    out = check_attention_args(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
                               k_scale, v_scale)
    num_seqs = seq_lens.shape[0] - seq_offset
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    if num_seqs <= 0 or query.shape[0] == 0 or max_query_len <= 0:
        return out
    config = config or PrefillConfig()
    group = num_heads // num_kv_heads
    upcast = dot_in_fp32(query)
    group_pad = triton.next_power_of_2(group)
    k_scale_arg, v_scale_arg, is_fp8 = scale_args(k_cache, k_scale, v_scale)
    # At least 16 rows for tl.dot; a large group gets few tokens per tile rather than huge tiles.
    block_q = max(config.rows_per_tile // group_pad, 16 // group_pad, 1)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        query_ptr=query,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        block_tables_ptr=block_tables,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        out_ptr=out,
        k_scale_ptr=k_scale_arg,
        v_scale_ptr=v_scale_arg,
        qk_scale=scale * LOG2E,
        seq_offset=seq_offset,
        stride_q_tok=query.stride(0),
        stride_q_head=query.stride(1),
        stride_cache_block=k_cache.stride(0),
        stride_cache_head=k_cache.stride(1),
        stride_cache_tok=k_cache.stride(2),
        stride_scale_block=num_kv_heads * block_size,
        stride_scale_head=block_size,
        stride_bt_seq=block_tables.stride(0),
        stride_out_tok=out.stride(0),
        stride_out_head=out.stride(1),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        DOT_PRECISION="ieee" if upcast else "tf32",
        UPCAST=upcast,
        IS_FP8=is_fp8,
        CAUSAL_SPLIT=config.causal_split,
        num_warps=config.num_warps,
        num_stages=pipeline_stages(config.num_stages, config.block_n, head_dim, k_cache.dtype),
    )
    return out
