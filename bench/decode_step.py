"""Time one decode step of the benchmark workload at full batch, with and without the fused kernels.

    python -m bench.decode_step                   # both modes in one run; prints a table
    python -m bench.decode_step --modes fused     # one mode (TOKENRELAY_FUSED_KERNELS decides the other)

Builds the Qwen3-0.6B-shaped checkpoint, adds the workload's 256 requests, steps until every one is
decoding, then times `--decode-steps` engine steps and the captured decode graph's replay alone. Writes
$OUT/decode_step.json when OUT is set."""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.workload import MODEL_SHAPES, make_checkpoint, make_workload
from engine.models.layers import FUSED_KERNELS_ENV


def _all_decoding(engine: object) -> bool:
    scheduler = engine.scheduler  # type: ignore[attr-defined]
    return len(scheduler.waiting) == 0 and all(
        r.num_computed_tokens + 1 >= r.num_tokens for r in scheduler.running)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model_dir: Path, mode: str, args: argparse.Namespace) -> dict[str, float]:
    from engine import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine

    os.environ[FUSED_KERNELS_ENV] = "1" if mode == "fused" else "0"  # read when the model is built
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=args.device, max_num_seqs=args.num_requests,
                                    max_num_batched_tokens=8192, max_model_len=2048,
                                    gpu_memory_utilization=args.gpu_memory_utilization))
    vocab_size = int(MODEL_SHAPES[args.model]["vocab_size"])  # type: ignore[call-overload]
    workload = make_workload(num_requests=args.num_requests, max_token_id=min(10000, vocab_size - 1))
    for i, (prompt, n_out) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        engine.add_request(f"r{i}", prompt_token_ids=prompt,
                           params=SamplingParams(max_tokens=n_out, temperature=args.temperature, ignore_eos=True), stream=False)
    num_prefill_steps = 0
    while not _all_decoding(engine):
        engine.step()
        num_prefill_steps += 1
    for _ in range(3):  # warm-up decode steps
        engine.step()
    num_running = len(engine.scheduler.running)
    _sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.decode_steps):
        engine.step()
    _sync(args.device)
    step_ms = (time.perf_counter() - t0) * 1e3 / args.decode_steps
    if len(engine.scheduler.running) != num_running:
        raise RuntimeError("a request finished during the timed steps; lower --decode-steps")

    graphs = engine.model_runner.decode_graphs
    replay_ms = float("nan")
    if graphs is not None and num_running in graphs.graphs:
        graph = graphs.graphs[num_running]
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.decode_steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        replay_ms = start.elapsed_time(end) / args.decode_steps
    mean_context = sum(r.num_tokens for r in engine.scheduler.running) / max(1, num_running)
    del engine, graphs
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return dict(temperature=args.temperature, step_ms=step_ms, replay_ms=replay_ms, batch=float(num_running), mean_context=mean_context,
                prefill_steps=float(num_prefill_steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--modes", default="torch,fused", help="comma list of: fused, torch")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=50)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as bench.throughput")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run (--model tiny)")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(args.model, Path(tmp) / "model", device=args.device)
        for mode in args.modes.split(","):
            results[mode] = measure(model_dir, mode, args)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"decode step, {args.model}, {device_name}")
    print("| mode | batch | mean context | engine step (ms) | graph replay (ms) | tok/s at this step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        print(f"| {mode} | {r['batch']:.0f} | {r['mean_context']:.0f} | {r['step_ms']:.2f} | "
              f"{r['replay_ms']:.2f} | {r['batch'] * 1e3 / r['step_ms']:.0f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "decode_step.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
