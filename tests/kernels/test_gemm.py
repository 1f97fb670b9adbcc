"""Split-K GEMM against x.float() @ w.float().T, and its plan (tiles and S per shape)."""

from __future__ import annotations

import pytest
import torch

import kernels.gemm as gemm
from kernels.gemm import SplitKConfig, linear_split_k, split_k_plan

# Small tiles so K=96/256 still spans several K blocks per split, and S=4 over K=96 leaves a split empty.
SMALL = dict(block_m=16, block_n=32, block_k=32)


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000 * m + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device)
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ w.float().T
    return y + b.float() if b is not None else y


@pytest.mark.parametrize("split_k", [1, 2, 4])
# K = 100: the last K block is ragged (the masked-load path).
@pytest.mark.parametrize("m, n, k", [(1, 64, 256), (5, 48, 96), (33, 64, 96), (33, 48, 256), (5, 48, 100)])
def test_matches_fp32_reference_with_bias(m: int, n: int, k: int, split_k: int, device: torch.device) -> None:
    x, w, b = _inputs(m, n, k, torch.bfloat16, device)
    out = linear_split_k(x, w, b, config=SplitKConfig(**SMALL, split_k=split_k))
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    # bf16 output: one rounding of the fp32 sum (relative 2**-8), nothing accumulated in bf16.
    torch.testing.assert_close(out.float(), _reference(x, w, b), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_fp32_is_exact_ish(split_k: int, device: torch.device) -> None:
    x, w, _ = _inputs(33, 64, 256, torch.float32, device)
    out = linear_split_k(x, w, None, config=SplitKConfig(**SMALL, split_k=split_k))
    torch.testing.assert_close(out, _reference(x, w, None), atol=1e-5, rtol=1e-5)


def test_second_call_reuses_workspace_and_counters_reset(device: torch.device) -> None:
    config = SplitKConfig(**SMALL, split_k=4)
    x, w, b = _inputs(5, 64, 256, torch.float16, device)
    first = linear_split_k(x, w, b, config=config)
    counters = list(gemm._counters.values())
    workspaces = {t.data_ptr() for t in gemm._workspaces.values()}
    assert counters and all(int(c.count_nonzero()) == 0 for c in counters), "a tile counter was left non-zero"
    second = linear_split_k(x, w, b, config=config)
    assert {t.data_ptr() for t in gemm._workspaces.values()} == workspaces, "a second workspace was allocated"
    torch.testing.assert_close(second, first, atol=0, rtol=0)  # deterministic: splits summed in order
    # Another input of the same bucket: stale partials or counters would show up here.
    x2, w2, _ = _inputs(5, 64, 256, torch.float16, device, seed=7)
    third = linear_split_k(x2, w2, None, config=config)
    torch.testing.assert_close(third.float(), _reference(x2, w2, None), atol=2e-2, rtol=1e-2)


def test_out_buffer_and_strided_x(device: torch.device) -> None:
    wide = torch.randn(5, 300, device=device)
    x = wide[:, 10:106]  # row stride 300
    w = torch.randn(48, 96, device=device)
    out = torch.empty(5, 48, device=device)
    assert linear_split_k(x, w, out=out, config=SplitKConfig(**SMALL, split_k=2)) is out
    torch.testing.assert_close(out, _reference(x, w, None), atol=1e-4, rtol=1e-4)


def test_default_plan_splits_and_matches(device: torch.device) -> None:
    x, w, b = _inputs(5, 64, 1024, torch.float32, device)
    assert split_k_plan(5, 64, 1024, gemm._num_sms(x.device)).split_k == 4  # one tile, K / 4 = 256
    torch.testing.assert_close(linear_split_k(x, w, b), _reference(x, w, b), atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise(device: torch.device) -> None:
    x = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match="weight \\[N, K\\]"):
        linear_split_k(x, torch.randn(16, 31, device=device))
    with pytest.raises(ValueError, match="weight must be"):
        linear_split_k(x, torch.randn(16, 32, device=device, dtype=torch.float16))
    with pytest.raises(ValueError, match="bias"):
        linear_split_k(x, torch.randn(16, 32, device=device), torch.randn(15, device=device))
    with pytest.raises(ValueError, match="out"):
        linear_split_k(x, torch.randn(16, 32, device=device), out=torch.empty(4, 15, device=device))


H200_SMS = 132


@pytest.mark.parametrize("m, n, k, expected", [
    # o_proj and down_proj of Qwen3-0.6B: 16 output tiles, so S grows until K / S would drop below 256.
    (64, 1024, 2048, SplitKConfig(64, 64, 128, 8)),
    (64, 1024, 3072, SplitKConfig(64, 64, 128, 8)),
    (1, 1024, 2048, SplitKConfig(16, 64, 128, 8)),
    (32, 1024, 2048, SplitKConfig(32, 64, 128, 8)),
    # 8 x 16 tiles: S = 4 reaches 2 x 132 programs.
    (512, 1024, 3072, SplitKConfig(64, 64, 128, 4)),
    # Already 2 x 132 tiles, or K too short to split: S = 1.
    (512, 4096, 1024, SplitKConfig(64, 64, 128, 1)),
    (16, 1024, 511, SplitKConfig(16, 64, 128, 1)),
])
def test_split_k_plan(m: int, n: int, k: int, expected: SplitKConfig) -> None:
    assert split_k_plan(m, n, k, H200_SMS) == expected


@pytest.mark.parametrize("m", [1, 17, 64, 300, 512])
@pytest.mark.parametrize("n, k", [(1024, 2048), (1024, 3072), (4096, 1024), (576, 1536)])
def test_split_k_plan_invariants(m: int, n: int, k: int) -> None:
    config = split_k_plan(m, n, k, H200_SMS)
    assert config.split_k & (config.split_k - 1) == 0, "S must be a power of two"
    assert config.split_k == 1 or k // config.split_k >= gemm.MIN_K_PER_SPLIT
    assert config.block_m >= min(m, 64) or config.block_m == 64
    tiles = -(-m // config.block_m) * -(-n // config.block_n)
    # The smallest S that reaches 2 x SMs: halving it would fall short (unless already S = 1).
    assert config.split_k == 1 or tiles * config.split_k // 2 < 2 * H200_SMS


def test_layer_switch_is_off_by_default_and_never_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.models import layers

    monkeypatch.delenv(layers.SPLIT_K_GEMM_ENV, raising=False)
    assert not layers.use_split_k_gemm(torch.device("cuda"), 1024)
    monkeypatch.setenv(layers.SPLIT_K_GEMM_ENV, "1")
    assert layers.use_split_k_gemm(torch.device("cuda"), 1024)
    assert not layers.use_split_k_gemm(torch.device("cuda"), 4096), "wide outputs stay on cuBLAS"
    assert not layers.use_split_k_gemm(torch.device("cpu"), 1024)
    assert not layers.Linear(64, 32).is_split_k  # built on the CPU: F.linear, the oracle, unchanged


def test_layer_forward_uses_split_k_only_for_small_batches(device: torch.device,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.models import layers

    linear = layers.Linear(96, 48, bias=True).to(device)
    linear.weight.data.normal_()
    assert linear.bias is not None
    linear.bias.data.normal_()
    linear.is_split_k = True  # what a CUDA build with SPLIT_K_GEMM_ENV=1 sets; the kernel runs here too
    calls: list[int] = []

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return linear_split_k(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gemm, "linear_split_k", counting)
    for num_tokens in (5, layers.SPLIT_K_MAX_TOKENS + 1):
        x = torch.randn(num_tokens, 96, device=device)
        torch.testing.assert_close(linear(x), _reference(x, linear.weight, linear.bias), atol=1e-4, rtol=1e-4)
    assert calls == [5], "batches above SPLIT_K_MAX_TOKENS must take F.linear"
