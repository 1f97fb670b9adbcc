"""SiLU(gate) * up for the gated MLP as one Triton kernel over the fused gate_up projection's output.

Rounds like torch's `F.silu(gate) * up` in the model dtype: silu computed in fp32 and rounded, then
the product rounded."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 1024  # columns per program: a 3072-wide MLP row is 3 programs


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]: gate | up
    out_ptr,  # [num_tokens, intermediate]
    stride_x_tok,
    stride_out_tok,
    intermediate,
    BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)  # 64-bit: tok * stride passes 2**31 at 16k tokens x 2 x 64k
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate
    row = x_ptr + tok * stride_x_tok
    gate = tl.load(row + offs, mask=mask, other=0.0)
    up = tl.load(row + intermediate + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + tok * stride_out_tok + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [num_tokens, 2 * intermediate]: gate in the first half, up in the second
    out: torch.Tensor | None = None,  # [num_tokens, intermediate], same dtype as x
) -> torch.Tensor:  # [num_tokens, intermediate]
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [num_tokens, 2 * intermediate]; got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be fp16, bf16 or fp32; got {x.dtype}")
    if x.numel() > 0 and x.stride(1) != 1:
        raise ValueError("x must be contiguous along its last dim (stride 1); call .contiguous() first")
    num_tokens, intermediate = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_tokens, intermediate), dtype=x.dtype, device=x.device)
    if out.shape != (num_tokens, intermediate) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be a {x.dtype} [{num_tokens}, {intermediate}] tensor on {x.device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.numel() > 0 and out.stride(1) != 1:
        raise ValueError("out must be contiguous along its last dim (stride 1)")
    if num_tokens == 0 or intermediate == 0:
        return out
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, BLOCK))](
        x_ptr=x,
        out_ptr=out,
        stride_x_tok=x.stride(0),
        stride_out_tok=out.stride(0),
        intermediate=intermediate,
        BLOCK=BLOCK,
        num_warps=4,
    )
    return out
