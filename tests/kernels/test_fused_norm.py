"""RMSNorm and fused residual-add + RMSNorm kernels against the HF-order torch references."""

from __future__ import annotations

import pytest
import torch

from kernels.fused_norm import fused_add_rms_norm, rms_norm
from kernels.reference import fused_add_rms_norm_ref, rms_norm_ref

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def _inputs(num_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    return x, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens, hidden", [(5, 128), (3, 96), (1, 1000)])
def test_rms_norm_matches_reference(dtype: torch.dtype, num_tokens: int, hidden: int,
                                    device: torch.device) -> None:
    x, weight = _inputs(num_tokens, hidden, dtype, device)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    _assert_close(out, rms_norm_ref(x, weight, 1e-6), dtype)


def test_rms_norm_uses_eps_and_weight(device: torch.device) -> None:
    x = torch.zeros(2, 64, device=device)
    x[0, 0] = 1e-3  # variance 1.6e-8: a large eps dominates it
    weight = torch.full((64,), 2.0, device=device)
    out = rms_norm(x, weight, 1.0)
    torch.testing.assert_close(out[0, 0], torch.tensor(2e-3, device=device), atol=1e-7, rtol=1e-4)
    assert torch.count_nonzero(out[1]) == 0


def test_rms_norm_strided_rows_and_in_place(device: torch.device) -> None:
    wide, weight = _inputs(4, 256, torch.float32, device)
    x = wide[:, :128]  # row stride 256, unit stride along hidden
    weight = weight[:128].contiguous()
    expected = rms_norm_ref(x, weight, 1e-5)
    out = rms_norm(x, weight, 1e-5, out=x)
    assert out.data_ptr() == x.data_ptr()
    _assert_close(wide[:, :128], expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_matches_reference(dtype: torch.dtype, device: torch.device) -> None:
    x, weight = _inputs(6, 192, dtype, device, seed=1)
    residual, _ = _inputs(6, 192, dtype, device, seed=2)
    expected_normed, expected_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    x_before = x.clone()
    normed, residual_out = fused_add_rms_norm(x, residual, weight, 1e-6)
    assert residual_out.data_ptr() == residual.data_ptr(), "residual_out must reuse residual's storage"
    # The sum is rounded to the model dtype as torch's add does, so on a GPU it matches bit for bit.
    # The interpreter truncates fp32 -> bf16 instead of rounding to nearest: one bf16 ulp there.
    exact = dtype == torch.float32 or device.type == "cuda"
    torch.testing.assert_close(residual_out, expected_residual, atol=0, rtol=0 if exact else 2 ** -7)
    _assert_close(normed, expected_normed, dtype)
    assert torch.equal(x, x_before)


def test_empty_batch(device: torch.device) -> None:
    x, weight = _inputs(0, 64, torch.float32, device)
    assert rms_norm(x, weight, 1e-6).shape == (0, 64)
    normed, residual = fused_add_rms_norm(x, x.clone(), weight, 1e-6)
    assert normed.shape == residual.shape == (0, 64)


def test_bad_arguments_raise(device: torch.device) -> None:
    x, weight = _inputs(4, 64, torch.float32, device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight[:32], 1e-6)
    with pytest.raises(ValueError, match=r"\[num_tokens, hidden\]"):
        rms_norm(x.view(2, 2, 64), weight, 1e-6)
    with pytest.raises(ValueError, match="stride 1"):
        rms_norm(x.t(), weight[:4].contiguous(), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, x[:2].clone(), weight, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, x.to(torch.bfloat16), weight, 1e-6)
