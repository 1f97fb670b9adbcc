"""The paged KV cache on the GPU: the layout checks every kernel shares, and the Triton kernel that
writes this step's keys and values into their slots (one program per token, all KV heads at once).

An fp8 (e4m3) cache carries one float32 scale per (token, KV head) beside it (kernels/reference.py):
the write quantizes each row with its own scale, the attention kernels dequantize in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import FP8_DTYPE, FP8_MAX, FP8_MIN_AMAX, PAD_SLOT_ID

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_DTYPES = (*SUPPORTED_DTYPES, FP8_DTYPE)
INDEX_DTYPES = (torch.int32, torch.int64)
# Kernels may read module globals only as constexpr.
_FP8_MAX = tl.constexpr(FP8_MAX)
_FP8_MIN_AMAX = tl.constexpr(FP8_MIN_AMAX)


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """Validates one layer's cache pair (and its scales, for fp8); returns (num_blocks, num_kv_heads,
    block_size, head_dim)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, num_kv_heads, block_size, head_dim]; "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(
            "k_cache/v_cache must share one dtype among fp16/bf16/fp32/float8_e4m3fn; "
            f"got {k_cache.dtype}, {v_cache.dtype}"
        )
    # The kernels index the cache with one set of strides and assume head_dim is the contiguous axis.
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous: allocate them with torch.empty(...)")
    if k_cache.device != v_cache.device:
        raise ValueError(f"k_cache is on {k_cache.device} but v_cache on {v_cache.device}")
    num_blocks, num_kv_heads, block_size, head_dim = k_cache.shape
    check_head_dim(head_dim)
    if k_cache.dtype == FP8_DTYPE:
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if (scale is None or tuple(scale.shape) != (num_blocks, num_kv_heads, block_size)
                    or scale.dtype != torch.float32 or not scale.is_contiguous()
                    or scale.device != k_cache.device):
                raise ValueError(
                    f"an fp8 KV cache needs {name}: a contiguous float32 tensor "
                    f"[num_blocks, num_kv_heads, block_size] = {(num_blocks, num_kv_heads, block_size)} "
                    f"on {k_cache.device}; got {None if scale is None else (scale.dtype, tuple(scale.shape))}"
                )
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale/v_scale belong to fp8 caches only; this cache is {k_cache.dtype}")
    return num_blocks, num_kv_heads, block_size, head_dim


def scale_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k_scale, v_scale, is_fp8) for a kernel launch; a non-fp8 cache passes itself as the (never
    read) scale pointers, so every launch has the same signature."""
    if k_scale is None or v_scale is None:
        return k_cache, k_cache, False
    return k_scale, v_scale, True


def check_head_dim(head_dim: int) -> None:
    # Power-of-two head dims keep every tile unmasked along D, so loads stay 16 bytes wide.
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256]; got {head_dim}")


def check_rows(name: str, tensor: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """A [num_tokens, heads, head_dim] activation: given shape, same device, unit stride on head_dim."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the KV cache is on {device}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be fp16, bf16 or fp32; got {tensor.dtype}")
    if tensor.numel() > 0 and tensor.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous along head_dim (stride 1); call .contiguous() first")


def check_slot_mapping(slot_mapping: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    """slot_mapping [num_tokens]: contiguous int32/int64 on the cache's device."""
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"slot_mapping must be an int32/int64 tensor of shape ({num_tokens},) "
            f"(PAD_SLOT_ID={PAD_SLOT_ID} for padding); got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.device != device or not slot_mapping.is_contiguous():
        raise ValueError(f"slot_mapping must be a contiguous tensor on {device}")


def dot_in_fp32(query: torch.Tensor) -> bool:
    """Whether the attention kernels run their tl.dot in fp32 (ieee): for fp32 inputs, and on CPU,
    where the Triton interpreter computes bf16 dots wrongly."""
    return query.dtype == torch.float32 or query.device.type != "cuda"


def pipeline_stages(requested: int, block_n: int, head_dim: int, dtype: torch.dtype) -> int:
    """Software-pipelining depth that keeps the K and V tiles in flight within ~160 KB of shared
    memory (H100: 227 KB a block), so wide heads or fp32 caches still compile."""
    stage_bytes = 2 * block_n * head_dim * dtype.itemsize
    return max(1, min(requested, (160 * 1024) // stage_bytes))


@triton.jit
def load_kv_tile(
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_table_row,  # pointer to this sequence's row of block_tables
    head_offset,  # kv_head * stride_cache_head, int64
    offs_n,  # [BLOCK_N] context positions of the tile
    mask_n,  # [BLOCK_N] which positions exist
    offs_d,  # [HEAD_DIM]
    stride_cache_block,
    stride_cache_tok,
    k_scale_ptr,  # [num_blocks, num_kv_heads, block_size] fp32 (read only when IS_FP8)
    v_scale_ptr,
    scale_head_offset,  # kv_head * stride_scale_head, int64
    stride_scale_block,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,  # return fp32 tiles
    IS_FP8: tl.constexpr,
):
    """One tile of K and V ([BLOCK_N, HEAD_DIM] each, in the cache's dtype or fp32 when UPCAST)
    gathered through the block table, and their per-token scales ([BLOCK_N] fp32; ones unless IS_FP8).
    The decode and prefill kernels share it so both address the paged cache the same way. An fp8 tile
    comes back unscaled (the kernels convert it, exactly, to the query's dtype, and apply the scales to
    the [rows, BLOCK_N] scores and probabilities, cheaper than scaling [BLOCK_N, HEAD_DIM] tiles)."""
    block_ids = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    # 64-bit: block_id * stride_cache_block passes 2**31 elements in a large pool.
    tok_offs = block_ids * stride_cache_block + head_offset + (offs_n % BLOCK_SIZE) * stride_cache_tok
    kv_offs = tok_offs[:, None] + offs_d[None, :]
    k = tl.load(k_cache_ptr + kv_offs, mask=mask_n[:, None], other=0.0)
    v = tl.load(v_cache_ptr + kv_offs, mask=mask_n[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IS_FP8:
        scale_offs = block_ids * stride_scale_block + scale_head_offset + offs_n % BLOCK_SIZE
        k_s = tl.load(k_scale_ptr + scale_offs, mask=mask_n, other=0.0)
        v_s = tl.load(v_scale_ptr + scale_offs, mask=mask_n, other=0.0)
    else:
        k_s = tl.full(offs_n.shape, 1.0, tl.float32)
        v_s = tl.full(offs_n.shape, 1.0, tl.float32)
    return k, v, k_s, v_s


@triton.jit
def round_to_e4m3(x):
    """x (fp32, |x| <= 448) rounded to the nearest e4m3 value (ties to even), still in fp32, so the
    cast to fp8 that follows is exact. Done by hand because the Triton interpreter's fp32 -> fp8 cast
    loses the carry when a mantissa rounds up into the next binade (124.0 became 64.0, triton 3.9);
    on the GPU it costs a few integer ops in a kernel that writes one token's rows."""
    bits = x.to(tl.int32, bitcast=True)
    # Normal e4m3 (|x| >= 2**-6): keep 3 of fp32's 23 mantissa bits; the carry may bump the exponent.
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # -0x100000 == ~0xFFFFF
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormal e4m3: multiples of 2**-9; adding 1.5 * 2**14 leaves fp32 exactly that resolution.
    subnormal = (x + 24576.0) - 24576.0
    rounded = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return tl.clamp(rounded, -_FP8_MAX, _FP8_MAX)


@triton.jit
def fp8_row_scale(amax):
    """[rows] fp32 scale of rows whose largest |value| is amax, as quantize_fp8_rows computes it."""
    return tl.maximum(amax, _FP8_MIN_AMAX) / _FP8_MAX


@triton.jit
def quantize_e4m3(x, scale):
    """x [rows, cols] fp32 over its rows' scales [rows], rounded to e4m3 (still fp32, so the cast to
    the fp8 cache that follows is exact). Shared with kernels/rope.py, which writes the cache too: one
    definition keeps both writers bit-identical."""
    return round_to_e4m3(tl.clamp(x / scale[:, None], -_FP8_MAX, _FP8_MAX))


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache_ptr,  # [num_blocks, num_kv_heads, block_size, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    stride_key_tok,
    stride_key_head,
    stride_value_tok,
    stride_value_head,
    stride_cache_block,
    stride_cache_head,
    stride_cache_tok,
    k_scale_ptr,  # [num_blocks, num_kv_heads, block_size] fp32 (written only when IS_FP8)
    v_scale_ptr,
    stride_scale_block,
    stride_scale_head,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # PAD_SLOT_ID: a padding token owns no slot
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < NUM_KV_HEADS)[:, None]
    src_k = token * stride_key_tok + offs_h[:, None] * stride_key_head + offs_d[None, :]
    src_v = token * stride_value_tok + offs_h[:, None] * stride_value_head + offs_d[None, :]
    # 64-bit: block * stride_cache_block passes 2**31 elements in a large pool.
    dst = block * stride_cache_block + offset * stride_cache_tok
    dst = dst + offs_h[:, None] * stride_cache_head + offs_d[None, :]
    k = tl.load(key_ptr + src_k, mask=mask)
    v = tl.load(value_ptr + src_v, mask=mask)
    if IS_FP8:
        # One scale per (token, head) row, computed as quantize_fp8_rows does: amax / 448 in fp32.
        k32, v32 = k.to(tl.float32), v.to(tl.float32)
        k_s = fp8_row_scale(tl.max(tl.abs(k32), axis=1))  # [HEADS_PAD]
        v_s = fp8_row_scale(tl.max(tl.abs(v32), axis=1))
        k = quantize_e4m3(k32, k_s)
        v = quantize_e4m3(v32, v_s)
        scale_dst = block * stride_scale_block + offs_h * stride_scale_head + offset
        tl.store(k_scale_ptr + scale_dst, k_s, mask=offs_h < NUM_KV_HEADS)
        tl.store(v_scale_ptr + scale_dst, v_s, mask=offs_h < NUM_KV_HEADS)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int, PAD_SLOT_ID for padding
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    """Stores token t's K/V at slot slot_mapping[t] (block s // block_size, offset s % block_size);
    tokens whose slot is PAD_SLOT_ID are skipped; an fp8 cache gets each row quantized with its own
    scale. Same result as write_kv_cache_ref."""
    _, num_kv_heads, block_size, head_dim = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    num_tokens = key.shape[0]
    check_rows("key", key, (num_tokens, num_kv_heads, head_dim), k_cache.device)
    check_rows("value", value, (num_tokens, num_kv_heads, head_dim), k_cache.device)
    check_slot_mapping(slot_mapping, num_tokens, k_cache.device)
    if num_tokens == 0:
        return
    k_scale_arg, v_scale_arg, is_fp8 = scale_args(k_cache, k_scale, v_scale)
    _write_kv_cache_kernel[(num_tokens,)](
        key_ptr=key,
        value_ptr=value,
        k_cache_ptr=k_cache,
        v_cache_ptr=v_cache,
        slot_mapping_ptr=slot_mapping,
        stride_key_tok=key.stride(0),
        stride_key_head=key.stride(1),
        stride_value_tok=value.stride(0),
        stride_value_head=value.stride(1),
        stride_cache_block=k_cache.stride(0),
        stride_cache_head=k_cache.stride(1),
        stride_cache_tok=k_cache.stride(2),
        k_scale_ptr=k_scale_arg,
        v_scale_ptr=v_scale_arg,
        stride_scale_block=num_kv_heads * block_size,
        stride_scale_head=block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        IS_FP8=is_fp8,
    )


def check_attention_args(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int
    out: torch.Tensor | None,  # [num_tokens, num_heads, head_dim] or None
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validates a paged-attention call without reading device memory (no host sync); returns `out`,
    allocated when None."""
    _, num_kv_heads, _, head_dim = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim]; got {tuple(query.shape)}")
    num_tokens, num_heads = query.shape[0], query.shape[1]
    check_rows("query", query, (num_tokens, num_heads, head_dim), k_cache.device)
    if query.dtype != k_cache.dtype and k_cache.dtype != FP8_DTYPE:
        raise ValueError(
            f"query ({query.dtype}) must have the KV cache's dtype ({k_cache.dtype}): cast it first"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    num_seqs = seq_lens.shape[0]
    for name, tensor, dims in (
        ("block_tables", block_tables, 2),
        ("seq_lens", seq_lens, 1),
        ("query_start_loc", query_start_loc, 1),
    ):
        if tensor.dim() != dims or tensor.dtype not in INDEX_DTYPES or tensor.device != k_cache.device:
            raise ValueError(f"{name} must be a {dims}-d int32/int64 tensor on {k_cache.device}")
    if block_tables.shape[0] != num_seqs or query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"block_tables must have num_seqs={num_seqs} rows and query_start_loc num_seqs + 1 entries; "
            f"got {tuple(block_tables.shape)} and {tuple(query_start_loc.shape)}"
        )
    if block_tables.stride(1) != 1 or not (seq_lens.is_contiguous() and query_start_loc.is_contiguous()):
        raise ValueError("block_tables rows, seq_lens and query_start_loc must be contiguous")
    if out is None:
        return torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    check_rows("out", out, (num_tokens, num_heads, head_dim), k_cache.device)
    return out
