"""Temperature sampling as one pass over the logits: Gumbel-max with the sampler's counter-based noise
(engine/sampler.py), the hash computed in registers instead of ~15 int64 passes over [rows, vocab].

For each row: argmax over the vocabulary of logits / temperature - log(-log(u)), where u is the
uniform the torch sampler draws for (seed, position, vocab index); a row with temperature 0 takes the
argmax of its logits (the first index among equal maxima, as torch.argmax). One program per row walks
the vocabulary in tiles, keeping the best (score, index) so far: the logits are read once, in their
own dtype, and nothing [rows, vocab]-sized is written."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK32 = tl.constexpr(0xFFFFFFFF)
# The largest float32 below 1 (engine/sampler.py _BELOW_ONE): u never reaches 1, so no noise is infinite.
_BELOW_ONE = tl.constexpr(1.0 - 2.0**-24)


@triton.jit
def _mul32(x, constant: tl.constexpr):
    # x * constant mod 2^32 with 16-bit halves of the constant (int64 products stay below 2^49), as the
    # torch sampler computes it.
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


@triton.jit
def _mix32(x):
    """murmur3's 32-bit finaliser on int64 lanes holding values in [0, 2^32): engine/sampler.py's _mix32
    line for line (a jit function cannot call torch code); tests/kernels/test_sampling.py holds the two
    to the same draws."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(
    logits_ptr,  # [N, V]
    temperature_ptr,  # [N] fp32; 0: greedy
    row_key_ptr,  # [N] int64 in [0, 2^32): the hash of (seed, position)
    out_ptr,  # [N] int64
    vocab_size,
    stride_row,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_scale = tl.where(greedy, 1.0, temperature)  # greedy rows divide by 1 and add no noise
    row_key = tl.load(row_key_ptr + row)
    best_score = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK_V], 0, tl.int64)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < vocab_size
        logits = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        vocab_key = _mix32(offs.to(tl.int64) ^ 0x1B873593)
        bits = _mix32(row_key ^ vocab_key)
        u = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) * (1.0 / (1 << 24)), _BELOW_ONE)
        noise = tl.where(greedy, 0.0, -tl.log(-tl.log(u)))
        score = tl.where(mask, logits / inv_scale + noise, float("-inf"))
        # Lane-wise running best; a later tile wins a lane only when strictly better, so each lane keeps
        # its first maximum.
        better = score > best_score
        best_score = tl.where(better, score, best_score)
        best_index = tl.where(better, offs.to(tl.int64), best_index)
    top = tl.max(best_score, axis=0)
    # The smallest vocabulary index among the lanes holding the maximum: torch.argmax's tie rule.
    index = tl.min(tl.where(best_score == top, best_index, vocab_size), axis=0)
    tl.store(out_ptr + row, index)


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, row_key: torch.Tensor,
                  block_v: int = 2048) -> torch.Tensor:
    """[N] int64 tokens: a draw from softmax(logits / temperature) per row (argmax where temperature is
    0). row_key [N] int64 in [0, 2^32) is the row's half of the noise hash (engine/sampler.py row_keys:
    of the seed and the position); the vocabulary index supplies the other half. No host sync."""
    if logits.dim() != 2 or logits.dtype not in SUPPORTED_DTYPES or logits.stride(1) != 1:
        raise ValueError(f"logits must be [N, V] fp16/bf16/fp32 with unit stride on V; got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    num_rows, vocab_size = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    _gumbel_argmax_kernel[(num_rows,)](
        logits, temperature.to(torch.float32).contiguous(), row_key.contiguous(), out,
        vocab_size, logits.stride(0), BLOCK_V=block_v, num_warps=8)
    return out
