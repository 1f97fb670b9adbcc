"""Decode attention over the paged KV cache (one query token per sequence): split-K flash-decoding,
one program per (sequence, KV head, context partition) serving every query head of that KV group.

A sequence whose context fits one partition writes its output directly; only longer ones go through
the partial buffers and the reduction. An fp8 cache is dequantized in registers (per-token scales
applied to the scores and probabilities)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.kv_cache import check_attention_args, dot_in_fp32, load_kv_tile, pipeline_stages, scale_args

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Tile and launch shape of the partition kernel (bench/kernels.py sweeps these)."""

    block_n: int = 64  # context tokens per loop iteration
    num_warps: int = 4
    # None: 3 for head_dim >= 128 (1.7% faster at the key point), 2 below (3 cost head_dim 64 ~15%):
    # measured on an H100, BENCHMARKS.md; 2 for fp8 caches (measured on an H200).
    num_stages: int | None = None
    use_dot: bool = True  # tl.dot with the head group padded to 16 rows, else broadcast-multiply + sum
    programs_per_sm: int = 4  # split the context until the grid holds this many programs per SM
    min_partition_tokens: int = 256  # never split finer than this: the reduction is not free
    # Split-K balancing: cap every partition at this many tokens, even when the batch alone fills the
    # GPU, so a ragged batch's long contexts do not leave a tail of lone programs (None: no cap).
    max_partition_tokens: int | None = None


@triton.jit
def _decode_partition_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables_ptr,  # [num_seqs, max_num_blocks_per_seq]
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    out_ptr,  # [num_tokens, num_heads, head_dim]: written directly by one-partition sequences
    partial_acc_ptr,  # [num_seqs, num_heads, num_partitions, head_dim] fp32, unnormalised
    partial_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32, log2 domain
    partial_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    k_scale_ptr,  # [num_blocks, num_kv_heads, block_size] fp32 (fp8 caches only)
    v_scale_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in exp2
    partition_size,  # context tokens per partition, a multiple of BLOCK_N
    num_partitions,
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
    GROUP_PAD: tl.constexpr,  # GROUP rounded up (to 16 when USE_DOT, for tl.dot)
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # compute in fp32: the interpreter's bf16 tl.dot is wrong (triton 3.9)
    IS_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    part_start = part * partition_size
    # Sequences shorter than the longest leave their trailing partitions (and padded rows) idle.
    if (q_len == 0) | (part_start >= seq_len):
        return
    part_end = tl.minimum(part_start + partition_size, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_g = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q_offs = q_start.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(query_ptr + q_offs, mask=mask_g[:, None], other=0.0)  # [GROUP_PAD, HEAD_DIM]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    head_offset = kv_head.to(tl.int64) * stride_cache_head
    scale_head_offset = kv_head.to(tl.int64) * stride_scale_head
    for start_n in range(part_start, part_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < part_end
        k, v, k_s, v_s = load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_table_row, head_offset, offs_n, mask_n, offs_d,
            stride_cache_block, stride_cache_tok, k_scale_ptr, v_scale_ptr, scale_head_offset,
            stride_scale_block, BLOCK_SIZE, UPCAST, IS_FP8)  # [BLOCK_N, HEAD_DIM], [BLOCK_N]
        if IS_FP8:  # e4m3 -> the query's dtype is exact
            k, v = k.to(q.dtype), v.to(q.dtype)
        if USE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            qk = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
        if IS_FP8:
            qk = qk * k_s[None, :]  # dequantize K per token: q . (k8 * s) = (q . k8) * s
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        # Every tile starts below part_end, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IS_FP8:
            # Dequantize V per token: p @ (v8 * s) = (p * s) @ v8. p * s is rounded to the query dtype:
            # bf16 keeps fp32's range; fp16 flushes below ~6e-8, so rows with amax under ~1e-2 lose bits.
            p = p * v_s[None, :]
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    o_offs = q_start.to(tl.int64) * stride_out_tok + heads[:, None] * stride_out_head + offs_d[None, :]
    if IS_SPLIT:
        # A sequence that fits one partition needs no reduction: it writes its output here.
        if seq_len <= partition_size:
            tl.store(out_ptr + o_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_g[:, None])
        else:
            row = (seq * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * num_partitions + part
            tl.store(partial_max_ptr + row, m_i, mask=mask_g)
            tl.store(partial_sum_ptr + row, l_i, mask=mask_g)
            tl.store(partial_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask_g[:, None])
    else:
        tl.store(out_ptr + o_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_g[:, None])


@triton.jit
def _decode_reduce_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    partial_acc_ptr,  # [num_seqs, num_heads, num_partitions, head_dim] fp32
    partial_max_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    partial_sum_ptr,  # [num_seqs, num_heads, num_partitions] fp32
    seq_lens_ptr,  # [num_seqs]
    query_start_loc_ptr,  # [num_seqs + 1]
    partition_size,
    num_partitions,
    stride_out_tok,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    PARTITIONS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_used = tl.cdiv(seq_len, partition_size)  # partitions past the sequence wrote nothing
    if num_used <= 1:  # the partition kernel wrote this sequence's output itself
        return
    offs_p = tl.arange(0, PARTITIONS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_p = offs_p < num_used
    row = (seq * tl.num_programs(1) + head).to(tl.int64) * num_partitions + offs_p
    m = tl.load(partial_max_ptr + row, mask=mask_p, other=float("-inf"))
    sums = tl.load(partial_sum_ptr + row, mask=mask_p, other=0.0)
    acc = tl.load(
        partial_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_p[:, None], other=0.0
    )
    weight = tl.math.exp2(m - tl.max(m, axis=0))  # 0 for unused partitions
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(sums * weight, axis=0)
    o_offs = q_start.to(tl.int64) * stride_out_tok + head.to(tl.int64) * stride_out_head + offs_d
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend to be an H100 so the split logic is exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_partitions(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, config: DecodeConfig
) -> int:
    """Split the context until the grid fills the GPU, but keep partitions >= min_partition_tokens;
    with max_partition_tokens, split at least until no partition is longer than that."""
    base_programs = max(1, num_seqs * num_kv_heads)
    wanted = math.ceil(config.programs_per_sm * num_sms / base_programs)
    most = max(1, math.ceil(max_seq_len / max(config.min_partition_tokens, config.block_n)))
    chosen = max(1, min(wanted, most))
    if config.max_partition_tokens is not None:
        chosen = max(chosen, math.ceil(max_seq_len / max(config.max_partition_tokens, config.block_n)))
    return chosen


def partition_plan(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    config: DecodeConfig,
    num_partitions: int | None = None,
) -> tuple[int, int]:
    """(num_partitions, partition_size) of a launch; partition_size is a multiple of block_n."""
    if num_partitions is None:
        num_partitions = choose_num_partitions(num_seqs, num_kv_heads, max_seq_len, _num_sms(device), config)
    partition_size = triton.cdiv(triton.cdiv(max_seq_len, num_partitions), config.block_n) * config.block_n
    return triton.cdiv(max_seq_len, partition_size), partition_size


def decode_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]: at most one token per sequence
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    scale: float,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    num_partitions: int | None = None,
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of each sequence's single new token over its cached context. max_seq_len is a host
    upper bound of seq_lens (it sizes the grid; under CUDA graphs pass the largest one captured)."""
    out = check_attention_args(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
                               k_scale, v_scale)
    config = config or DecodeConfig()
    num_seqs = seq_lens.shape[0]
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    if num_seqs == 0 or query.shape[0] == 0 or max_seq_len <= 0:
        return out
    if config.block_n < 16 or config.block_n & (config.block_n - 1):
        raise ValueError(f"DecodeConfig.block_n must be a power of two >= 16; got {config.block_n}")
    group = num_heads // num_kv_heads
    upcast = dot_in_fp32(query)
    k_scale_arg, v_scale_arg, is_fp8 = scale_args(k_cache, k_scale, v_scale)
    num_partitions, partition_size = partition_plan(
        num_seqs, num_kv_heads, max_seq_len, query.device, config, num_partitions
    )
    is_split = num_partitions > 1
    # 3 stages suit bf16 at head_dim 128; an fp8 cache runs 16% faster with 2 (359 against 426 us at
    # 256 x ~2048, H200, BENCHMARKS.md), and equal at head_dim 64.
    num_stages = config.num_stages or (3 if head_dim >= 128 and not is_fp8 else 2)
    scratch_shape = (num_seqs, num_heads, num_partitions) if is_split else (1, 1, 1)
    partial_max = torch.empty(scratch_shape, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    partial_acc = torch.empty(
        (*scratch_shape, head_dim) if is_split else (1,), dtype=torch.float32, device=query.device
    )
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        query_ptr=query,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        block_tables_ptr=block_tables,
        seq_lens_ptr=seq_lens,
        query_start_loc_ptr=query_start_loc,
        out_ptr=out,
        partial_acc_ptr=partial_acc,
        partial_max_ptr=partial_max,
        partial_sum_ptr=partial_sum,
        k_scale_ptr=k_scale_arg,
        v_scale_ptr=v_scale_arg,
        qk_scale=scale * LOG2E,
        partition_size=partition_size,
        num_partitions=num_partitions,
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
        GROUP_PAD=max(16, triton.next_power_of_2(group)) if config.use_dot else triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        USE_DOT=config.use_dot,
        IS_SPLIT=is_split,
        DOT_PRECISION="ieee" if upcast else "tf32",
        UPCAST=upcast,
        IS_FP8=is_fp8,
        num_warps=config.num_warps,
        num_stages=pipeline_stages(num_stages, config.block_n, head_dim, k_cache.dtype),
    )
    if is_split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out_ptr=out,
            partial_acc_ptr=partial_acc,
            partial_max_ptr=partial_max,
            partial_sum_ptr=partial_sum,
            seq_lens_ptr=seq_lens,
            query_start_loc_ptr=query_start_loc,
            partition_size=partition_size,
            num_partitions=num_partitions,
            stride_out_tok=out.stride(0),
            stride_out_head=out.stride(1),
            HEAD_DIM=head_dim,
            PARTITIONS_PAD=triton.next_power_of_2(num_partitions),
            num_warps=4,
        )
    return out
