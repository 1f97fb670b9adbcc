"""SiLU-and-mul kernel against the torch reference."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul
from kernels.reference import silu_and_mul_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, intermediate", [(3, 64), (2, 1500)])  # 1500: a masked second block
def test_silu_and_mul_matches_reference(dtype: torch.dtype, num_tokens: int, intermediate: int,
                                        device: torch.device) -> None:
    gen = torch.Generator().manual_seed(intermediate)
    x = (torch.randn(num_tokens, 2 * intermediate, generator=gen) * 4).to(dtype).to(device)
    out = silu_and_mul(x)
    assert out.shape == (num_tokens, intermediate) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=tol, rtol=tol)


def test_gate_and_up_halves_are_not_swapped(device: torch.device) -> None:
    x = torch.tensor([[2.0, 1.0, 3.0, 0.0]], device=device)  # gate (2, 1), up (3, 0)
    expected = torch.tensor([[3 * 2 / (1 + torch.exp(torch.tensor(-2.0)).item()), 0.0]], device=device)
    torch.testing.assert_close(silu_and_mul(x), expected)


def test_strided_rows_and_out_buffer(device: torch.device) -> None:
    wide = torch.randn(4, 200, device=device)
    x = wide[:, :128]
    out = torch.empty(4, 64, device=device)
    assert silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise(device: torch.device) -> None:
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="stride 1"):
        silu_and_mul(torch.randn(8, 4, device=device).t())
    with pytest.raises(ValueError, match="out"):
        silu_and_mul(torch.randn(2, 8, device=device), out=torch.empty(2, 8, device=device))
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        silu_and_mul(torch.ones(2, 8, dtype=torch.int32, device=device))
