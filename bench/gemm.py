"""The decode step's GEMMs at small M: cuBLAS (torch's F.linear) against a plain Triton GEMM over a
sweep of tiles, each set beside its floor (weight bytes at the copy bandwidth, FLOPs at the measured
matmul rate, whichever is larger).

    python -m bench.gemm [--model qwen3-0.6b] [--m 32,128,256]      # GPU; table last, JSON in $OUT

Times are CUDA-graph replays (triton.testing.do_bench_cudagraph), so launch overhead is not counted
twice: inside the engine's decode graph a GEMM pays only its GPU time."""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from bench.throughput import copy_bandwidth, matmul_rate
from bench.workload import MODEL_SHAPES


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[M, N] = x[M, K] @ w[N, K]^T, one [BLOCK_M, BLOCK_N] tile per program; N-major order so the
    # programs that share a weight tile run together.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_n, pid_m = pid // num_m, pid % num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(w_ptrs, mask=offs_n[:, None] < N, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def triton_linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, config: tuple[int, ...]) -> torch.Tensor:
    block_m, block_n, block_k, warps, stages = config
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """(name, N, K) of the decode step's GEMMs."""
    s: dict[str, Any] = MODEL_SHAPES[model]
    hidden, heads, kv_heads, d = s["hidden_size"], s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]
    return [("qkv", (heads + 2 * kv_heads) * d, hidden), ("o", hidden, heads * d),
            ("gate_up", 2 * s["intermediate_size"], hidden), ("down", hidden, s["intermediate_size"]),
            ("lm_head", s["vocab_size"], hidden)]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): 4 warps up to 64 x 64 tiles, 8 above, both at 64 x 128.
CONFIGS = [(bm, bn, bk, w, st) for bm, bn, bk, st in itertools.product((32, 64, 128), (32, 64, 128), (64, 128), (3, 4))
           for w in (4, 8) if (w == 4) == (bm * bn <= 4096) or bm * bn == 8192]


def bench_shape(m: int, n: int, k: int, bandwidth: float, matmul: float, rep: int, tile_sweep: bool = True
                ) -> dict[str, Any]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    floor = max((n * k + m * k + m * n) * 2 / bandwidth, 2 * m * n * k / matmul)
    ref = F.linear(x, w)
    cublas = triton.testing.do_bench_cudagraph(lambda: torch.mm(x, w.t(), out=out), rep=rep)
    best: tuple[float, tuple[int, ...]] = (float("inf"), ())
    for config in CONFIGS if tile_sweep else []:
        if config[0] > max(32, triton.next_power_of_2(m)):
            continue  # a tile taller than the batch computes padding
        try:
            triton_linear(x, w, out, config)
            if not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
                raise RuntimeError(f"wrong result for {config}")
            ms = triton.testing.do_bench_cudagraph(lambda c=config: triton_linear(x, w, out, c), rep=rep)
        except triton.runtime.errors.OutOfResources:
            continue
        best = min(best, (ms, config))
    return dict(m=m, n=n, k=k, floor_us=floor * 1e6, cublas_us=cublas * 1e3, triton_us=best[0] * 1e3,
                triton_config=best[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-0.6b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--m", default="32,128,256")
    parser.add_argument("--rep", type=int, default=25, help="ms of replays per timing")
    parser.add_argument("--no-tile-sweep", action="store_true", help="skip the plain Triton GEMM's tile sweep")
    args = parser.parse_args()
    device = "cuda"
    bandwidth, matmul = copy_bandwidth(device), matmul_rate(device)
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        for name, n, k in layer_shapes(args.model):
            row = bench_shape(m, n, k, bandwidth, matmul, args.rep, not args.no_tile_sweep)
            rows.append(dict(name=name, **row))
            print(f"m={m:<4}{name:<8} floor {row['floor_us']:7.1f} us  cublas {row['cublas_us']:7.1f}  "
                  f"triton {row['triton_us']:7.1f} {row['triton_config']}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"gemm-{args.model}.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), bandwidth_tb_s=bandwidth / 1e12,
                 matmul_tflop_s=matmul / 1e12, rows=rows), indent=1))
    print(f"{'m':>4} {'gemm':<8}{'floor us':>9}{'cublas':>8}{'of floor':>9}{'triton':>8}{'of floor':>9}  best tile")
    for m in sorted({r["m"] for r in rows}):
        mrows = [r for r in rows if r["m"] == m]
        for r in mrows:
            print(f"{r['m']:>4} {r['name']:<8}{r['floor_us']:>9.1f}{r['cublas_us']:>8.1f}"
                  f"{r['floor_us'] / r['cublas_us']:>9.2f}{r['triton_us']:>8.1f}"
                  f"{r['floor_us'] / r['triton_us']:>9.2f}  {r['triton_config']}")
        per_layer = [r for r in mrows if r["name"] != "lm_head"]
        layers = MODEL_SHAPES[args.model]["num_hidden_layers"]
        assert isinstance(layers, int)
        for key in ("floor_us", "cublas_us", "triton_us"):
            total = layers * sum(r[key] for r in per_layer) + sum(r[key] for r in mrows if r["name"] == "lm_head")
            print(f"{m:>4} step total {key[:-3]:<7}{total / 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
