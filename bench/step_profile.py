"""Where a decode step's time goes: the engine on the benchmark workload, all 256 requests decoding.

    python -m bench.step_profile        # GPU; prints ms/step, a cProfile of 30 steps, and a breakdown
    python -m bench.step_profile --at-batch 48   # also the kernels of a step once the batch is down to 48

The breakdown synchronises CUDA at each piece's boundaries, so pieces add up to more than an
unsynchronised step (and async scheduling overlaps nothing there); it attributes GPU time to the piece
that launched it."""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import engine.model_runner as model_runner_module
from bench.workload import make_checkpoint, make_workload
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--at-batch", type=int, default=None,
                        help="after the batch-256 breakdown, decode until this many requests run and profile again")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    model_dir = make_checkpoint("qwen3-0.6b", Path(tmp) / "model", device="cuda")
    workload = make_workload()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", max_num_seqs=256,
                                    max_num_batched_tokens=16384, max_model_len=2048))
    engine.generate(workload.prompts[:4], [SamplingParams(max_tokens=16, ignore_eos=True)] * 4)
    engine.scheduler.reset_prefix_cache()
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, stream=False,
                           params=SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
    scheduler, runner = engine.scheduler, engine.model_runner
    t0, steps = time.perf_counter(), 0
    while scheduler.num_waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in scheduler.running):
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    print(f"prefill phase: {steps} steps {time.perf_counter() - t0:.2f} s, running {scheduler.num_running}")
    t0 = time.perf_counter()
    for _ in range(50):
        engine.step()
    torch.cuda.synchronize()
    print(f"decode: {(time.perf_counter() - t0) / 50 * 1e3:.2f} ms/step at batch {scheduler.num_running}")

    kernel_profile(engine, steps=10)

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(30):
        engine.step()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(15)
    print(text.getvalue())

    totals: dict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            torch.cuda.synchronize()
            totals[name] += time.perf_counter() - start
            return result
        return wrapper

    scheduler.schedule = timed("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.schedule_ahead = timed("schedule ahead", scheduler.schedule_ahead)  # type: ignore[method-assign]
    scheduler.update_from_output = timed("update", scheduler.update_from_output)  # type: ignore[method-assign]
    if runner.decode_graphs is not None:
        runner.decode_graphs.run = timed("graph replay", runner.decode_graphs.run)  # type: ignore[method-assign]
    runner.sampler = timed("sampler", runner.sampler)  # type: ignore[assignment]
    runner.model.compute_logits = timed("logits", runner.model.compute_logits)  # type: ignore[method-assign]
    from_params = model_runner_module.SamplingMetadata.from_params
    model_runner_module.SamplingMetadata.from_params = timed("sampling metadata", from_params)  # type: ignore[method-assign]
    engine.output_processor.process = timed("outputs", engine.output_processor.process)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    for _ in range(50):
        engine.step()
    elapsed = time.perf_counter() - t0
    print(f"synchronised: {elapsed / 50 * 1e3:.2f} ms/step at batch {scheduler.num_running}")
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{name:<20}{total / 50 * 1e3:8.3f} ms/step")
    if args.at_batch is not None:
        while scheduler.num_running > args.at_batch:
            engine.step()
        lens = [r.num_tokens for r in scheduler.running]
        print(f"\nat batch {len(lens)}: mean context {sum(lens) / max(len(lens), 1):.0f} tokens")
        kernel_profile(engine, steps=10)


def kernel_profile(engine: LLMEngine, steps: int) -> None:
    """GPU time per kernel over `steps` engine steps (graph replays included: CUPTI reports the kernels
    a graph launches), and how much of each step's wall time the GPU spent in kernels at all."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in rows)
    print(f"kernel time {kernel_us / steps / 1e3:.2f} ms/step of {wall / steps * 1e3:.2f} ms wall "
          f"(GPU busy {kernel_us / 1e6 / wall:.0%}) at batch {engine.scheduler.num_running}")
    print(f"{'kernel':<72}{'calls/step':>11}{'us/step':>10}")
    for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"{e.key[:70]:<72}{e.count / steps:>11.1f}{e.self_device_time_total / steps:>10.1f}")


if __name__ == "__main__":
    main()
