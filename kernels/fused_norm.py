"""RMSNorm and residual-add + RMSNorm as one Triton kernel each: one program per token row.

Numerics follow HF's LlamaRMSNorm/Qwen3RMSNorm: the sum of squares in fp32, the normalised value cast
to the input dtype, then multiplied by the weight and rounded again (what `weight * x.to(dtype)` does)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]: the sublayer output (or the input when HAS_RESIDUAL is False)
    residual_ptr,  # [num_tokens, hidden]: overwritten with x + residual when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden]: RMSNorm(x + residual) or RMSNorm(x)
    stride_x_tok,
    stride_res_tok,
    stride_out_tok,
    hidden,
    inv_hidden,  # 1 / hidden: torch's mean multiplies the sum by it
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= hidden: the whole row lives in registers
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride passes 2**31 at 16k tokens x 128k hidden
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x_tok + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res_ptrs = residual_ptr + row * stride_res_tok + offs
        # HF adds in the model dtype (residual + hidden_states), so round the sum before normalising it.
        x = (tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(res_ptrs, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) * inv_hidden
    normed = (x32 * tl.math.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out_tok + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_row_tensor(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.shape != like.shape or tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(
            f"{name} must match x ({tuple(like.shape)}, {like.dtype}, {like.device}); got "
            f"{tuple(tensor.shape)}, {tensor.dtype}, {tensor.device}")
    if tensor.numel() > 0 and tensor.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along hidden (stride 1); call .contiguous() first")


def _check_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [num_tokens, hidden]; got shape {tuple(x.shape)} (flatten leading dims)")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be fp16, bf16 or fp32; got {x.dtype}")
    if x.numel() > 0 and x.stride(1) != 1:
        raise ValueError("x must be contiguous along hidden (stride 1); call .contiguous() first")
    if weight.shape != (x.shape[1],) or weight.device != x.device or not weight.is_contiguous():
        raise ValueError(
            f"weight must be a contiguous [{x.shape[1]}] tensor on {x.device}; got {tuple(weight.shape)} "
            f"on {weight.device}")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor) -> None:
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x_ptr=x,
        residual_ptr=residual if residual is not None else x,
        weight_ptr=weight,
        out_ptr=out,
        stride_x_tok=x.stride(0),
        stride_res_tok=residual.stride(0) if residual is not None else 0,
        stride_out_tok=out.stride(0),
        hidden=hidden,
        inv_hidden=1.0 / hidden,
        eps=eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        # One row per program: 4 warps hold up to 4k elements at <= 32 per thread, wider rows get 8-16.
        num_warps=min(16, max(4, block // 1024)),
    )


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,  # [num_tokens, hidden], same dtype as x
) -> torch.Tensor:  # [num_tokens, hidden]
    """RMSNorm(x) * weight, HF numerics; out may be x itself (each row is read before it is written)."""
    _check_args(x, weight)
    if out is None:
        out = torch.empty_like(x)
    _check_row_tensor("out", out, x)
    _launch(x, None, weight, eps, out)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]: the sublayer output
    residual: torch.Tensor,  # [num_tokens, hidden]: the residual stream, overwritten with x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, residual_out), both [num_tokens, hidden]
    """residual_out = x + residual (rounded to the model dtype, as HF adds), normed = RMSNorm(residual_out).

    residual_out is `residual` itself, updated in place: the caller hands over the residual stream and
    must not read the old values again. normed is a new tensor (x is left untouched)."""
    _check_args(x, weight)
    _check_row_tensor("residual", residual, x)
    out = torch.empty_like(x)
    _launch(x, residual, weight, eps, out)
    return out, residual
