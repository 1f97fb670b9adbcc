"""Split-K GEMM for narrow, deep projections at decode batch sizes (o_proj, down_proj): y = x @ W.T + b
as one kernel launch, with its fp32 workspace and tile counters cached per (device, size bucket).

A [M <= 512, N ~ 1024] output has too few tiles to keep every SM reading the weight, so K is split over
S programs per tile. Each writes its fp32 partial, bumps the tile's counter (acq_rel, gpu scope), and the
program that sees the count reach S - 1 sums splits 0..S-1 in order (deterministic), adds the bias,
writes the output and puts the counter back to 0, so the next call or graph replay starts from zero."""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_K_PER_SPLIT = 256  # below this a split's weight slice is too short to hide its load latency
MAX_SPLIT_K = 16


@dataclasses.dataclass(frozen=True)
class SplitKConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # S: programs per output tile, each over a contiguous slice of K
    num_warps: int = 4
    num_stages: int = 3


def split_k_plan(m: int, n: int, k: int, num_sms: int) -> SplitKConfig:
    """Tiles and S for y[m, n] = x[m, k] @ W[n, k].T: the shortest tile that holds the batch, and the
    smallest power-of-two S that gives ~2 programs per SM while each split keeps >= 256 of K."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, 128
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k = 1
    while (split_k * 2 <= MAX_SPLIT_K and k // (split_k * 2) >= MIN_K_PER_SPLIT
           and num_tiles * split_k < 2 * num_sms):
        split_k *= 2
    return SplitKConfig(block_m, block_n, block_k, split_k)


@triton.jit
def _split_k_gemm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    out_ptr,  # [M, N], x's dtype
    workspace_ptr,  # [num_tiles, SPLIT_K, BLOCK_M, BLOCK_N] fp32 partials (unused when SPLIT_K == 1)
    counter_ptr,  # [num_tiles] int32, zero between launches (unused when SPLIT_K == 1)
    M, N, K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: every K block is whole, so loads need no K mask
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in fp32 (ieee): fp32 inputs (F.linear uses no tf32), and the interpreter
):
    # M-tiles fastest, then splits: the programs that read the same weight slice run side by side.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    split = (pid // num_m) % SPLIT_K
    pid_n = pid // (num_m * SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:  # a mask along the contiguous dim would keep the loads from being vectorised
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k + offs_k) < k_end
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = pid_n * num_m + pid_m
        tile_elems = BLOCK_M * BLOCK_N
        offs_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_ws = workspace_ptr + tile.to(tl.int64) * (SPLIT_K * tile_elems)
        tl.store(tile_ws + split * tile_elems + offs_tile, acc)
        # Every thread's partial must be issued before the one thread that does the release bumps the
        # counter (bar.sync, then a release RMW: cumulative, as in CUTLASS's semaphore).
        tl.debug_barrier()
        count = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT_K - 1:
            # The acquire makes the other splits' partials visible; .cg reads them from L2, not a stale L1.
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(tile_ws + s * tile_elems + offs_tile, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counter_ptr + tile, 0)  # the next launch, later in stream order, starts from zero


# Workspaces and counters, keyed by (device, power-of-two size). Sharing one buffer between all calls
# of a bucket is safe because the engine issues every GEMM on one stream: a launch starts only after the
# previous one (which read its partials and zeroed its counters) has finished, eagerly or in a graph
# replay. Two streams running these GEMMs concurrently would need their own caches.
_workspaces: dict[tuple[torch.device, int], torch.Tensor] = {}
_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def _cached_buffer(cache: dict[tuple[torch.device, int], torch.Tensor], device: torch.device, numel: int,
                   dtype: torch.dtype) -> torch.Tensor:
    bucket = triton.next_power_of_2(numel)
    key = (device, bucket)
    buffer = cache.get(key)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Allocated inside a capture, the zeroing would run only at replay and the memory would sit
            # in the graph's pool: run the same shapes once eagerly first (the engine's warm-up does).
            raise RuntimeError(f"linear_split_k: no cached workspace of {bucket} elements on {device} "
                               "while capturing a CUDA graph; call it once with these shapes before capture")
        buffer = torch.zeros(bucket, dtype=dtype, device=device)  # counters start, and stay, zero
        cache[key] = buffer
    return buffer


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be fp16, bf16 or fp32; got {x.dtype}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be {x.dtype} on {x.device}; got {weight.dtype} on {weight.device}")
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a {x.dtype} [{n}] tensor on {x.device}; "
                         f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if out is not None and (out.shape != (x.shape[0], n) or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must be a {x.dtype} [{x.shape[0]}, {n}] tensor on {x.device}; "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: pretend to be an H100 so the default plan still splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear_split_k(
    x: torch.Tensor,  # [M, K] fp16/bf16/fp32
    weight: torch.Tensor,  # [N, K], x's dtype
    bias: torch.Tensor | None = None,  # [N], x's dtype
    out: torch.Tensor | None = None,  # [M, N], x's dtype
    config: SplitKConfig | None = None,  # None: split_k_plan for this shape and device
) -> torch.Tensor:  # [M, N]
    _check_args(x, weight, bias, out)
    m, k = x.shape
    n = weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    if config is None:
        config = split_k_plan(m, n, k, _num_sms(x.device))
    bm, bn, bk, split_k = config.block_m, config.block_n, config.block_k, config.split_k
    num_tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    if split_k > 1:
        workspace = _cached_buffer(_workspaces, x.device, num_tiles * split_k * bm * bn, torch.float32)
        counters = _cached_buffer(_counters, x.device, num_tiles, torch.int32)
    else:
        workspace = counters = out  # never read: the kernel's SPLIT_K == 1 branch has no epilogue pass
    _split_k_gemm_kernel[(num_tiles * split_k,)](
        x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else out, out_ptr=out,
        workspace_ptr=workspace, counter_ptr=counters,
        M=m, N=n, K=k, k_per_split=k_per_split,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        HAS_BIAS=bias is not None, EVEN_K=k % bk == 0, SPLIT_K=split_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        # The interpreter's bf16/fp16 tl.dot is wrong (triton 3.9): on the CPU every dot runs in fp32.
        UPCAST=x.dtype == torch.float32 or x.device.type != "cuda",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
