"""Priority lanes under a batch backlog: interactive TTFT with 10,000 batch jobs queued against the same
load on an empty queue, and the batch throughput meanwhile against batch alone; plotted against the
interactive rate.

    python -m bench.lanes                       # CPU, stand-in GPU (bench/fake_gpu.py), own redis + worker
    python -m bench.lanes --fake-gpu none --model qwen3-0.6b --device cuda      # a real GPU

Saturation is the interactive workload's own: the request rate a burst of it reaches on an empty queue.
The interactive load is Poisson at fractions of that rate; batch throughput is counted from the batch
lane's consumer group (entries acknowledged per second) over windows of --window-s."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serving import (
    RESULTS_DIR,
    WorkerKnobs,
    percentile,
    run_load,
    start_redis,
    start_worker,
    wait_ready,
)
from bench.workload import Workload, make_checkpoint

PREFIX = "lanes"


class _NoProgress:
    def update(self, n: int) -> None:
        pass


def _workload(num: int, prompt_len: int, output_len: int, seed: int, vocab: int = 4096) -> Workload:
    rng = random.Random(seed)
    return Workload([[rng.randrange(2, vocab) for _ in range(prompt_len)] for _ in range(num)], [output_len] * num)


def _batch_done(client: Any, total: int) -> int:
    """Batch jobs acknowledged so far: queued total minus undelivered (lag) minus pending."""
    stream = f"{PREFIX}:jobs:batch"
    group = next(g for g in client.xinfo_groups(stream) if g["name"] == f"{PREFIX}:workers".encode())
    return total - int(group["lag"] or 0) - int(group["pending"])


def _fill_batch(client: Any, num: int, prompt_len: int, output_len: int) -> None:
    work = _workload(num, prompt_len, output_len, seed=1)
    pipe = client.pipeline(transaction=False)
    for i, prompt in enumerate(work.prompts):
        job = {"id": f"batch-{i}", "lane": "batch", "prompt_token_ids": prompt, "result_ttl_s": 600,
               "params": {"max_tokens": output_len, "temperature": 0, "ignore_eos": True}}
        pipe.xadd(f"{PREFIX}:jobs:batch", {"job": json.dumps(job)})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def _batch_rate(client: Any, total: int, seconds: float) -> float:
    start_n, start_s = _batch_done(client, total), time.perf_counter()
    time.sleep(seconds)  # a measurement window, not a synchronisation
    return (_batch_done(client, total) - start_n) / (time.perf_counter() - start_s)


def _interactive(redis_url: str, work: Workload, rate: float, label: str) -> dict[str, float]:
    result = asyncio.run(run_load(redis_url, PREFIX, work, rate, label, seed=7, progress=_NoProgress()))
    return {"rate": rate, "n": len(result.ttft_s), "req_s": len(result.e2e_s) / result.wall_s,
            "ttft_p50_ms": percentile(result.ttft_s, 50) * 1000, "ttft_p99_ms": percentile(result.ttft_s, 99) * 1000,
            "e2e_p50_ms": percentile(result.e2e_s, 50) * 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fake-gpu", default="7,10", help="bench/fake_gpu.py spec (base ms, us per token); none: real")
    p.add_argument("--model", default="tiny", help="bench.workload shape of the random checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-batch", type=int, default=10_000, help="batch jobs queued before the interactive load")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--fractions", default="0.125,0.25,0.5", help="interactive rates, as fractions of saturation")
    p.add_argument("--window-s", type=float, default=20.0, help="seconds of each measured window")
    p.add_argument("--prompt-len", type=int, default=64, help="interactive prompt tokens (batch: twice this)")
    p.add_argument("--output-len", type=int, default=32, help="interactive output tokens (batch: twice this)")
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    import redis

    work_dir = Path(tempfile.mkdtemp(prefix="bench-lanes-"))
    redis_proc, redis_url = start_redis(work_dir)
    worker: subprocess.Popen[bytes] | None = None
    try:
        model_dir = make_checkpoint(args.model, work_dir / "model")
        knobs = WorkerKnobs(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=4096, max_model_len=512,
                            num_kv_blocks=2048 if args.device == "cpu" else None)
        worker_args = argparse.Namespace(model_dir=str(model_dir), device=args.device, engine_process="auto",
                                         torch_threads=None,
                                         fake_gpu=None if args.fake_gpu == "none" else args.fake_gpu)
        log_path = work_dir / "worker.log"
        worker = start_worker(worker_args, redis_url, PREFIX, knobs, log_path)
        wait_ready(redis_url, PREFIX, worker, log_path)
        client = redis.Redis.from_url(redis_url)
        n_sat = 4 * args.max_num_seqs
        _interactive(redis_url, _workload(args.max_num_seqs, args.prompt_len, args.output_len, 2), float("inf"),
                     "warmup")
        burst = _interactive(redis_url, _workload(n_sat, args.prompt_len, args.output_len, 3), float("inf"), "sat")
        sat_rate = burst["req_s"]
        print(f"saturation: {sat_rate:.1f} interactive req/s (burst of {n_sat})", flush=True)

        def load(fraction: float, label: str) -> dict[str, float]:
            rate = fraction * sat_rate
            num = max(20, int(rate * args.window_s))
            return _interactive(redis_url, _workload(num, args.prompt_len, args.output_len, 11), rate, label)

        empty = {f: load(f, f"empty-{f}") for f in fractions}
        for f, row in empty.items():
            print(f"empty queue, {f:.3f} x sat: TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms",
                  flush=True)
        _fill_batch(client, args.num_batch, 2 * args.prompt_len, 2 * args.output_len)
        time.sleep(3.0)  # let the batch lane fill every seat before measuring
        alone = [_batch_rate(client, args.num_batch, args.window_s)]
        print(f"batch alone: {alone[0]:.1f} jobs/s", flush=True)
        backlog: dict[float, dict[str, float]] = {}
        for f in fractions:
            start_n, start_s = _batch_done(client, args.num_batch), time.perf_counter()
            row = load(f, f"backlog-{f}")
            row["batch_jobs_s"] = (_batch_done(client, args.num_batch) - start_n) / (time.perf_counter() - start_s)
            backlog[f] = row
            print(f"backlog, {f:.3f} x sat: TTFT p50 {row['ttft_p50_ms']:.0f} ms p99 {row['ttft_p99_ms']:.0f} ms, "
                  f"batch {row['batch_jobs_s']:.1f} jobs/s", flush=True)
        alone.append(_batch_rate(client, args.num_batch, args.window_s))
        remaining = args.num_batch - _batch_done(client, args.num_batch)
        batch_alone = sum(alone) / len(alone)
        print(f"batch alone again: {alone[1]:.1f} jobs/s; {remaining} batch jobs still queued", flush=True)
        if remaining <= 0:
            print("warning: the batch backlog ran out during the measurement", flush=True)
        rows = []
        for f in fractions:
            e, b = empty[f], backlog[f]
            rows.append({"fraction": f, "rate": b["rate"], "ttft_p50_empty_ms": e["ttft_p50_ms"],
                         "ttft_p99_empty_ms": e["ttft_p99_ms"], "ttft_p50_backlog_ms": b["ttft_p50_ms"],
                         "ttft_p99_backlog_ms": b["ttft_p99_ms"], "ttft_p50_ratio": b["ttft_p50_ms"] / e["ttft_p50_ms"],
                         "batch_jobs_s": b["batch_jobs_s"], "batch_ratio": b["batch_jobs_s"] / batch_alone,
                         # Output tokens of both lanes against batch alone: how much of the GPU is still used.
                         "total_token_ratio": (b["batch_jobs_s"] * 2 * args.output_len + b["req_s"] * args.output_len)
                         / (batch_alone * 2 * args.output_len)})
        print("\n| interactive rate (x sat) | TTFT p50 empty / backlog (ms) | p99 empty / backlog (ms) | "
              "p50 ratio | batch jobs/s (x alone) | all output tok/s (x batch alone) |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['fraction']:.3f} ({r['rate']:.1f}/s) | {r['ttft_p50_empty_ms']:.0f} / "
                  f"{r['ttft_p50_backlog_ms']:.0f} | {r['ttft_p99_empty_ms']:.0f} / {r['ttft_p99_backlog_ms']:.0f} | "
                  f"{r['ttft_p50_ratio']:.2f} | {r['batch_jobs_s']:.1f} ({r['batch_ratio']:.2f}) | "
                  f"{r['total_token_ratio']:.2f} |")
        today = datetime.date.today().isoformat()
        report = {"date": today, "machine": platform.node(), "args": vars(args), "saturation_req_s": sat_rate,
                  "batch_alone_jobs_s": alone, "rows": rows, "batch_remaining": remaining}
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"lanes-{'fake-gpu' if args.fake_gpu != 'none' else args.device}-{today}.json"
        out.write_text(json.dumps(report, indent=1))
        _plot(rows, out.with_suffix(".png"))
        print(f"wrote {out}")
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    x = [r["fraction"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("ttft_p50_empty_ms", "p50, empty queue"), ("ttft_p50_backlog_ms", "p50, batch backlog"),
                       ("ttft_p99_empty_ms", "p99, empty queue"), ("ttft_p99_backlog_ms", "p99, batch backlog")):
        ax1.plot(x, [r[key] for r in rows], marker="o", label=label)
    ax1.set(xlabel="interactive rate (fraction of saturation)", ylabel="TTFT (ms)", title="interactive TTFT")
    ax1.legend()
    ax2.plot(x, [r["batch_ratio"] for r in rows], marker="o")
    ax2.axhline(0.8, linestyle="--", color="grey")
    ax2.set(xlabel="interactive rate (fraction of saturation)", ylabel="batch throughput / batch alone",
            title="batch throughput", ylim=(0, 1.1))
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
