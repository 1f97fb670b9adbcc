"""Kernel benchmark: device copy bandwidth, then the decode attention kernel's achieved bandwidth
(bytes of K/V it must read + q/out, over the median time) across batch, context, head_dim and GQA,
bf16 and fp8 caches, and the split-K balancing cap; the prefill kernel's TFLOP/s by tile and loop.

Run on a GPU: `python -m bench.kernels [--quick]`; prints a table last, writes JSON to $OUT if set."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import triton
import triton.testing

from kernels import DecodeConfig, PrefillConfig, decode_attention, prefill_attention
from kernels.decode_attention import partition_plan
from kernels.reference import quantize_fp8_rows

BLOCK_SIZE = 16
NUM_KV_HEADS = 8  # Qwen3-0.6B: 16 query heads over 8 KV heads, head_dim 128
KEY_POINT = {"batch": 128, "context": 2048, "head_dim": 128, "group": 2}


@dataclass
class DecodeCase:
    batch: int
    context: int  # tokens of context per sequence (the maximum when ragged)
    head_dim: int
    group: int  # query heads per KV head
    ragged: bool = False  # contexts uniform in [100, context], as in the throughput workload
    config: DecodeConfig = field(default_factory=DecodeConfig)
    num_partitions: int | None = None
    label: str = ""
    kv_cache_dtype: str = "auto"  # or "fp8": e4m3 values plus an fp32 scale per (token, head)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy."""
    src = torch.randn(2**29, device=device)  # 2 GiB fp32
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_decode_inputs(case: DecodeCase, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    if case.ragged:
        seq_lens = torch.randint(100, case.context + 1, (case.batch,), generator=gen)
    else:
        seq_lens = torch.full((case.batch,), case.context)
    blocks_per_seq = (seq_lens + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = int(blocks_per_seq.sum())
    max_blocks = int(blocks_per_seq.max())
    # Shuffled pool: neighbouring blocks of a sequence are not neighbours in memory.
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = torch.zeros(case.batch, max_blocks, dtype=torch.int32)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), blocks_per_seq.cumsum(0)[:-1]])
    for i in range(case.batch):
        block_tables[i, : blocks_per_seq[i]] = order[starts[i] : starts[i] + blocks_per_seq[i]]
    shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, case.head_dim)
    num_heads = NUM_KV_HEADS * case.group
    caches = {"k_cache": torch.randn(shape, device=device, dtype=torch.bfloat16),
              "v_cache": torch.randn(shape, device=device, dtype=torch.bfloat16)}
    if case.kv_cache_dtype == "fp8":
        for name in ("k", "v"):
            caches[f"{name}_cache"], caches[f"{name}_scale"] = quantize_fp8_rows(caches[f"{name}_cache"])
    return {
        "query": torch.randn(case.batch, num_heads, case.head_dim, device=device, dtype=torch.bfloat16),
        **caches,
        "block_tables": block_tables.to(device),
        "seq_lens": seq_lens.to(torch.int32).to(device),
        "query_start_loc": torch.arange(case.batch + 1, dtype=torch.int32, device=device),
        "scale": case.head_dim**-0.5,
        "max_seq_len": int(seq_lens.max()),
    }


def bench_decode(case: DecodeCase, device: torch.device, copy_bw: float) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(case.batch * 7919 + case.context)
    inputs = make_decode_inputs(case, device, gen)
    out = torch.empty_like(inputs["query"])

    def run() -> None:
        decode_attention(**inputs, out=out, config=case.config, num_partitions=case.num_partitions)

    # Eager timing includes the Python launcher whenever it outlasts the GPU work; the engine replays
    # decode under CUDA graphs, so the graph replay is the kernel figure (and proves it captures).
    eager_ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    # Bytes the kernel cannot avoid: each sequence's K and V once (bf16, or fp8 plus its fp32 scale),
    # q read, out written (bf16).
    row_bytes = case.head_dim + 4 if case.kv_cache_dtype == "fp8" else 2 * case.head_dim
    kv_bytes = int(inputs["seq_lens"].sum()) * NUM_KV_HEADS * row_bytes * 2
    io_bytes = 2 * inputs["query"].numel() * 2
    bandwidth = (kv_bytes + io_bytes) / (ms * 1e-3)
    num_partitions, _ = partition_plan(
        case.batch, NUM_KV_HEADS, inputs["max_seq_len"], device, case.config, case.num_partitions
    )
    return {
        **{k: v for k, v in asdict(case).items() if k != "config"},
        "num_partitions": num_partitions,
        "config": asdict(case.config),
        "time_us": ms * 1e3,
        "eager_time_us": eager_ms * 1e3,
        "bytes": kv_bytes + io_bytes,
        "bandwidth_tb_s": bandwidth / 1e12,
        "fraction_of_copy": bandwidth / copy_bw,
    }


def bench_prefill(
    device: torch.device, num_seqs: int, prompt_len: int, config: PrefillConfig, kv_cache_dtype: str = "auto"
) -> dict[str, Any]:
    """One causal prefill of num_seqs fresh prompts (head_dim 128, 16 heads over 8 KV heads)."""
    head_dim, group = 128, 2
    num_blocks = num_seqs * prompt_len // BLOCK_SIZE
    shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, head_dim)
    k_cache = torch.randn(shape, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k_scale = v_scale = None
    if kv_cache_dtype == "fp8":
        (k_cache, k_scale), (v_cache, v_scale) = quantize_fp8_rows(k_cache), quantize_fp8_rows(v_cache)
    block_tables = torch.randperm(num_blocks, device=device).to(torch.int32).view(num_seqs, -1)
    num_tokens = num_seqs * prompt_len
    query = torch.randn(num_tokens, NUM_KV_HEADS * group, head_dim, device=device, dtype=torch.bfloat16)
    seq_lens = torch.full((num_seqs,), prompt_len, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(0, num_tokens + 1, prompt_len, dtype=torch.int32, device=device)
    ms = triton.testing.do_bench(
        lambda: prefill_attention(
            query,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            head_dim**-0.5,
            prompt_len,
            config=config,
            k_scale=k_scale,
            v_scale=v_scale,
        ),
        warmup=25,
        rep=100,
        return_mode="median",
    )
    flops = num_seqs * 2 * 2 * (prompt_len * (prompt_len + 1) / 2) * head_dim * NUM_KV_HEADS * group
    return {
        "num_seqs": num_seqs,
        "prompt_len": prompt_len,
        "config": asdict(config),
        "kv_cache_dtype": kv_cache_dtype,
        "time_us": ms * 1e3,
        "tflop_s": flops / (ms * 1e-3) / 1e12,
    }


def decode_cases(quick: bool) -> list[DecodeCase]:
    key = DecodeCase(**KEY_POINT, label="key")  # type: ignore[arg-type]
    cases = [key, DecodeCase(256, 2048, 128, 2, ragged=True, label="workload")]
    # The split-K balancing cap and the fp8 cache on the workload's ragged shape (and Llama's head_dim).
    for kv in ("auto", "fp8"):
        for head_dim, context in ((128, 2048), (128, 4224), (64, 2048)):
            for cap in (None, 512, 1024):
                if kv == "auto" and cap is None and (head_dim, context) == (128, 2048):
                    continue  # the "workload" row
                cases.append(DecodeCase(256, context, head_dim, 2 if head_dim == 128 else 4, ragged=True,
                                        config=DecodeConfig(max_partition_tokens=cap),
                                        label=f"{kv}{'' if cap is None else f'/{cap}'}", kv_cache_dtype=kv))
    if quick:
        return cases
    # Tile shapes and split factors at the key point: the tuning evidence.
    for use_dot, block_n, num_warps, num_stages in [
        (True, 32, 4, 2),
        (True, 64, 4, 2),
        (True, 64, 8, 2),
        (True, 128, 4, 2),
        (True, 128, 8, 2),
        (True, 128, 8, 3),
        (True, 64, 8, 3),
        (True, 64, 4, 1),
        (False, 16, 4, 2),
        (False, 32, 4, 2),
    ]:
        config = DecodeConfig(block_n=block_n, num_warps=num_warps, num_stages=num_stages, use_dot=use_dot)
        cases.append(DecodeCase(**KEY_POINT, config=config, label="tune"))  # type: ignore[arg-type]
    for parts in (1, 2, 4, 8):
        cases.append(DecodeCase(**KEY_POINT, num_partitions=parts, label=f"split{parts}"))  # type: ignore[arg-type]
    # Small batches live on the split: partition floor and grid target.
    for batch, context in ((1, 8192), (8, 2048), (32, 512)):
        for min_tokens, per_sm in ((128, 4), (512, 4), (256, 8), (256, 2)):
            config = DecodeConfig(min_partition_tokens=min_tokens, programs_per_sm=per_sm)
            cases.append(DecodeCase(batch, context, 128, 2, config=config, label=f"p{min_tokens}/{per_sm}"))
    for batch in (1, 8, 32, 128, 256):
        for context in (128, 512, 2048, 8192):
            cases.append(DecodeCase(batch, context, 128, 2, label="sweep"))
    for head_dim in (64, 128):
        for group in (1, 4, 8):
            cases.append(DecodeCase(64, 2048, head_dim, group, label="gqa"))
    return cases


PREFILL_SWEEP_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 128, 8, 2), (64, 32, 4, 3),
                       (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (32, 64, 4, 2)]


def prefill_sweep(device: torch.device) -> None:
    rows = []
    for num_seqs, prompt_len in ((4, 2048), (2, 4096)):
        for tile in PREFILL_SWEEP_TILES:
            for causal_split in (False, True) if tile == PREFILL_SWEEP_TILES[0] else (True,):
                try:
                    row = bench_prefill(device, num_seqs, prompt_len, PrefillConfig(*tile, causal_split=causal_split))
                except triton.runtime.errors.OutOfResources:
                    continue
                rows.append(row)
                print(f"prefill {num_seqs}x{prompt_len} tile(rows,n,w,s)={tile} causal_split={causal_split!s:<5}: "
                      f"{row['time_us']:.0f} us, {row['tflop_s']:.0f} TFLOP/s", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prefill-sweep.json"), "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="copy bandwidth, key point and workload only")
    parser.add_argument("--prefill-sweep", action="store_true",
                        help="only the prefill kernel: a wider tile sweep at 4 x 2048 and 2 x 4096 (bf16 cache)")
    args = parser.parse_args()
    if args.prefill_sweep:
        prefill_sweep(torch.device("cuda"))
        return
    device = torch.device("cuda")
    started = time.time()
    copy_bw = copy_bandwidth(device)
    results = []
    for case in decode_cases(args.quick):
        results.append(bench_decode(case, device, copy_bw))
        torch.cuda.empty_cache()  # the next case's cache may be large
    prefill_tiles = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]
    if args.quick:
        prefill_tiles = [(64, 64, 4, 2), (128, 64, 8, 2)]
    prefill = []
    for kv in ("auto", "fp8"):
        for tile in prefill_tiles:
            for causal_split in (False, True):
                config = PrefillConfig(*tile, causal_split=causal_split)
                prefill.append(bench_prefill(device, 4, 2048, config, kv))
                torch.cuda.empty_cache()
    report = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_tb_s": copy_bw / 1e12,
        "decode": results,
        "prefill": prefill,
        "wall_s": time.time() - started,
    }
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(f"device {report['device']}  torch {torch.__version__}  triton {triton.__version__}")
    for row in prefill:
        c = row["config"]
        tile = (c["rows_per_tile"], c["block_n"], c["num_warps"], c["num_stages"])
        print(
            f"prefill {row['num_seqs']}x{row['prompt_len']} {row['kv_cache_dtype']:<4} tile(rows,n,w,s)={tile} "
            f"causal_split={c['causal_split']!s:<5}: {row['time_us']:.0f} us, {row['tflop_s']:.0f} TFLOP/s"
        )
    print(f"copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")
    print(
        f"{'label':8} {'batch':>5} {'ctx':>5} {'D':>4} {'G':>2} {'cfg(dot,n,w,s)':>16} {'parts':>5} "
        f"{'us':>8} {'eager':>7} {'TB/s':>6} {'%copy':>6}"
    )
    for r in results:
        c = r["config"]
        cfg = f"{'d' if c['use_dot'] else 'b'},{c['block_n']},{c['num_warps']},{c['num_stages'] or 'auto'}"
        if c["max_partition_tokens"]:
            cfg += f",<={c['max_partition_tokens']}"
        ctx = f"{'~' if r['ragged'] else ''}{r['context']}"
        print(
            f"{r['label']:8} {r['batch']:>5} {ctx:>5} {r['head_dim']:>4} {r['group']:>2} {cfg:>16} "
            f"{r['num_partitions']:>5} {r['time_us']:>8.1f} {r['eager_time_us']:>7.1f} "
            f"{r['bandwidth_tb_s']:>6.2f} "
            f"{100 * r['fraction_of_copy']:>5.1f}%"
        )


if __name__ == "__main__":
    main()
