"""Where a whole run's seconds go: every engine step of a workload, timed and set beside its own floor.

    python -m bench.timeline [--workload benchmark|prefill-heavy] [--model qwen3-0.6b]   # GPU
    python -m bench.timeline --model tiny --device cpu --num-requests 8                  # CPU smoke run

Each step is classed by what it computes: "mixed" (a prefill chunk in it) or decode-only, by batch
size. Its floor is the bytes it must read at the copy bandwidth (the KV of every scheduled token's
context plus the weights once) or, for mixed steps, its FLOPs at the measured matmul rate, whichever is
larger. "sum floor" counts the step's kernels one after another instead: the decode rows' KV bytes at
the copy rate, plus the GEMMs (weight bytes or FLOPs, the larger), plus the prefill chunks' causal
attention FLOPs at the matmul rate; for a mixed step that is the fairer bound. Wall time per step is the gap between step() returns; under async scheduling that is the GPU's
time per step whenever the GPU is the bottleneck. The table says which class holds the lost seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.throughput import copy_bandwidth, matmul_rate
from bench.workload import (
    MODEL_SHAPES,
    _dims,
    kv_bytes_per_token,
    make_checkpoint,
    make_workload,
    named_workload,
    num_parameters,
)
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.scheduler_output import SchedulerOutput

BATCH_BUCKETS = (192, 128, 64, 16, 1)  # decode-only steps: batch >= each bound


@dataclass
class StepRecord:
    tokens: int  # scheduled tokens
    seqs: int
    prefill_tokens: int  # tokens of requests with more than one scheduled token
    context_tokens: int  # sum over scheduled requests of the context their attention reads
    decode_context_tokens: int = 0  # the same over the one-token rows only
    prefill_pairs: int = 0  # causal (query, key) pairs of the prefill chunks
    wall_s: float = 0.0


@dataclass
class Bucket:
    steps: int = 0
    wall_s: float = 0.0
    floor_s: float = 0.0
    sum_floor_s: float = 0.0
    tokens: int = 0

    def row(self, name: str) -> dict[str, Any]:
        return dict(bucket=name, steps=self.steps, wall_s=self.wall_s, floor_s=self.floor_s,
                    ms_per_step=1e3 * self.wall_s / max(self.steps, 1),
                    of_floor=self.floor_s / self.wall_s if self.wall_s else 0.0,
                    lost_s=self.wall_s - self.floor_s, tokens=self.tokens, sum_floor_s=self.sum_floor_s,
                    of_sum_floor=self.sum_floor_s / self.wall_s if self.wall_s else 0.0)


@dataclass
class Timeline:
    records: list[StepRecord] = field(default_factory=list)

    def record(self, out: SchedulerOutput, computed: dict[str, int]) -> None:
        scheduled = out.num_scheduled_tokens
        prefill = sum(n for n in scheduled.values() if n > 1)
        context = sum(computed.get(rid, 0) + n for rid, n in scheduled.items())
        decode_context = sum(computed.get(rid, 0) + 1 for rid, n in scheduled.items() if n == 1)
        pairs = sum(n * computed.get(rid, 0) + n * (n + 1) // 2 for rid, n in scheduled.items() if n > 1)
        self.records.append(StepRecord(out.total_num_scheduled_tokens, len(scheduled), prefill, context,
                                       decode_context, pairs))


def bucket_name(rec: StepRecord) -> str:
    if rec.prefill_tokens:
        return "mixed (prefill chunk)"
    bound = next(b for b in BATCH_BUCKETS if rec.seqs >= b)
    return f"decode batch >= {bound}"


def summarize(records: list[StepRecord], kv_per_token: int, weight_bytes: int, flops_per_token: float,
              bandwidth: float, matmul: float, flops_per_pair: float = 0.0) -> list[dict[str, Any]]:
    """Per-bucket wall time and floors; flops_per_pair: attention FLOPs of one causal (query, key) pair
    over all layers and heads (4 x head_dim x heads x layers)."""
    buckets: dict[str, Bucket] = {}
    total = Bucket()
    for rec in records:
        floor = max((rec.context_tokens * kv_per_token + weight_bytes) / bandwidth,
                    rec.tokens * flops_per_token / matmul)
        sum_floor = (rec.decode_context_tokens * kv_per_token / bandwidth
                     + max(weight_bytes / bandwidth, rec.tokens * flops_per_token / matmul)
                     + rec.prefill_pairs * flops_per_pair / matmul)
        for b in (buckets.setdefault(bucket_name(rec), Bucket()), total):
            b.steps += 1
            b.wall_s += rec.wall_s
            b.floor_s += floor
            b.sum_floor_s += sum_floor
            b.tokens += rec.tokens
    rows = [buckets[name].row(name) for name in sorted(buckets)]
    rows.append(total.row("all"))
    return rows


def warm_up(engine: LLMEngine, prompts: list[list[int]]) -> None:
    """Every kernel variant the run will use, compiled before the clock starts: prefill, decode (CUDA
    graphs), and a mixed step (prompts arriving while others decode)."""
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    engine.generate(prompts, [params] * len(prompts))
    half = len(prompts) // 2
    for i, prompt in enumerate(prompts[:half]):
        engine.add_request(f"warm{i}", prompt_token_ids=prompt, stream=False, params=params)
    engine.step()
    engine.step()
    for i, prompt in enumerate(prompts[half:]):
        engine.add_request(f"warm{half + i}", prompt_token_ids=prompt, stream=False, params=params)
    while engine.has_unfinished():
        engine.step()


def run(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int]) -> list[StepRecord]:
    timeline = Timeline()
    scheduler = engine.scheduler
    computed: dict[str, int] = {}
    for name in ("schedule", "schedule_ahead"):
        original = getattr(scheduler, name)

        def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            out = _original(*args, **kwargs)
            if out is not None and not out.is_empty:
                computed.update({r.req_id: r.num_computed_tokens for r in out.new_requests})
                computed.update({r.req_id: r.num_computed_tokens for r in out.cached_requests})
                timeline.record(out, computed)
            return out

        setattr(scheduler, name, wrapped)
    for i, (prompt, n) in enumerate(zip(prompts, output_lens, strict=True)):
        engine.add_request(f"t{i}", prompt_token_ids=prompt, stream=False,
                           params=SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
    # A step() returns once the step launched before it has been read: its wall gap belongs to the
    # oldest step not yet timed.
    last, timed = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        now = time.perf_counter()
        if timed < len(timeline.records):
            timeline.records[timed].wall_s = now - last
            timed += 1
        last = now
    return timeline.records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--workload", default="benchmark", choices=["benchmark", "prefill-heavy"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    args = parser.parse_args()
    if args.model == "tiny":  # smoke run: short requests inside the tiny vocabulary
        workload = make_workload(args.num_requests, 16, 64, max_token_id=4000, output_range=(4, 16))
    else:
        workload = named_workload(args.workload, args.num_requests)
    shape = MODEL_SHAPES[args.model]
    max_len = max(len(p) + n for p, n in zip(workload.prompts, workload.output_lens, strict=True))
    params = num_parameters(shape)
    cuda = args.device.startswith("cuda")
    weight_bytes = params * (2 if cuda else 4)
    bandwidth, matmul = copy_bandwidth(args.device), matmul_rate(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(args.model, Path(tmp) / "model", device=args.device,
                                    dtype="bfloat16" if cuda else "float32")
        engine = LLMEngine(EngineConfig(model=str(model_dir), device=args.device, max_num_seqs=256,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        max_model_len=max_len))
        warm_up(engine, workload.prompts[:4])
        engine.scheduler.reset_prefix_cache()
        started = time.perf_counter()
        records = run(engine, workload.prompts, workload.output_lens)
        wall = time.perf_counter() - started
        engine.shutdown()
    layers, heads, head_dim = _dims(shape, "num_hidden_layers", "num_attention_heads", "head_dim")
    rows = summarize(records, kv_bytes_per_token(shape), weight_bytes, 2.0 * params, bandwidth, matmul,
                     4.0 * head_dim * heads * layers)
    report = dict(model=args.model, workload=args.workload, device=args.device, wall_s=wall,
                  copy_bandwidth_tb_s=bandwidth / 1e12, matmul_tflop_s=matmul / 1e12, buckets=rows,
                  date=time.strftime("%Y-%m-%d"))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"timeline-{args.model}-{args.workload}.json").write_text(json.dumps(report, indent=1))
    print(f"{args.model} {args.workload}: {wall:.2f} s, {len(records)} steps, copy {bandwidth / 1e12:.2f} TB/s, "
          f"matmul {matmul / 1e12:.0f} TFLOP/s")
    print(f"{'bucket':<24}{'steps':>6}{'wall s':>8}{'floor s':>8}{'ms/step':>8}{'of floor':>9}{'lost s':>8}"
          f"{'sum floor':>10}{'of sum':>7}")
    for r in rows:
        print(f"{r['bucket']:<24}{r['steps']:>6}{r['wall_s']:>8.3f}{r['floor_s']:>8.3f}{r['ms_per_step']:>8.2f}"
              f"{r['of_floor']:>9.2f}{r['lost_s']:>8.3f}{r['sum_floor_s']:>10.3f}{r['of_sum_floor']:>7.2f}")


if __name__ == "__main__":
    main()
