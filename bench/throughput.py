"""Offline throughput on the benchmark workload: our engine, HF static generate and HF continuous
batching, side by side in one run, with the roofline from measured copy bandwidth.

    python -m bench.throughput                 # full workload (GPU), Qwen3-0.6B shape
    python -m bench.throughput --quick         # small smoke run (CPU or GPU)
    python -m bench.throughput --baselines 64  # HF baselines on the first 64 requests only
    python -m bench.throughput --baselines 0 --async-scheduling both   # ours with and without, one run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.workload import MODEL_SHAPES, Workload, make_checkpoint, make_workload, roofline_bytes


def copy_bandwidth(device: str, num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    if not device.startswith("cuda"):
        return float("nan")
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes / sorted(times)[len(times) // 2]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(model_dir: Path, workload: Workload, args: argparse.Namespace,
             async_scheduling: bool = True) -> dict[str, float]:
    from engine import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(
        model=str(model_dir), device=args.device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization,
        async_scheduling=async_scheduling))
    params = [SamplingParams(max_tokens=n, temperature=args.temperature, ignore_eos=True)
              for n in workload.output_lens]
    # Warm-up: a few requests through every path (prefill, decode, CUDA graph capture).
    engine.generate(workload.prompts[:4], [SamplingParams(max_tokens=16, ignore_eos=True)] * 4)
    engine.scheduler.reset_prefix_cache()  # the timed run must not hit the warm-up's prompts
    _sync(args.device)
    t0 = time.perf_counter()
    outs = engine.generate(workload.prompts, params)
    _sync(args.device)
    wall = time.perf_counter() - t0
    num_out = sum(len(o.token_ids) for o in outs)
    if num_out != workload.num_output_tokens:
        raise RuntimeError(f"engine produced {num_out} tokens, expected {workload.num_output_tokens}")
    stats = engine.stats()
    result = dict(wall_s=wall, tok_s=num_out / wall, num_steps=float(stats.num_steps),
                  preemptions=float(stats.num_preemptions), peak_kv_usage=engine.peak_kv_usage,
                  kv_waste_at_peak=engine.kv_waste_at_peak)
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def _hf_model(model_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def run_hf_static(model_dir: Path, workload: Workload, device: str, batch_size: int = 64) -> dict[str, float]:
    """HF `generate` in static batches of 64 (left padding); only requested tokens count."""
    model = _hf_model(model_dir, device)
    pad = 0
    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[start:start + batch_size]
        max_new = max(workload.output_lens[start:start + batch_size])
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                           do_sample=False, pad_token_id=pad)
    _sync(device)
    wall = time.perf_counter() - t0
    del model
    return dict(wall_s=wall, tok_s=workload.num_output_tokens / wall)


def run_hf_continuous(model_dir: Path, workload: Workload, device: str) -> dict[str, float]:
    """HF continuous batching (`init_continuous_batching`, paged|sdpa) with per-request max_new_tokens."""
    from transformers import GenerationConfig

    model = _hf_model(model_dir, device)
    model.set_attn_implementation("paged|sdpa")
    gen_config = GenerationConfig(max_new_tokens=max(workload.output_lens), do_sample=False,
                                  eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen_config)
    manager.start()
    _sync(device)
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(workload.prompts, workload.output_lens, strict=True)):
        manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
    num_done, num_tokens = 0, 0
    while num_done < len(workload.prompts):
        result = manager.get_result(timeout=5)
        if result is not None and result.is_finished():
            num_done += 1
            num_tokens += len(result.generated_tokens)
    _sync(device)
    wall = time.perf_counter() - t0
    manager.stop(block=True)
    del model
    return dict(wall_s=wall, tok_s=num_tokens / wall, num_tokens=float(num_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--quick", action="store_true", help="32 short requests on the tiny model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--baselines", type=int, default=64,
                        help="run the HF baselines on the first N requests (0 skips them)")
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--skip-cb", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", choices=["on", "off", "both"], default="on",
                        help="both: our engine twice, without then with (rows 'tokenrelay sync' / 'tokenrelay')")
    parser.add_argument("--json", default=None, help="write the results here (default: $OUT or bench/out)")
    args = parser.parse_args()

    if args.quick:
        args.model = "tiny"
        workload = make_workload(num_requests=32, min_len=16, max_len=64, max_token_id=4000)
        args.max_model_len = 256
        args.baselines = min(args.baselines, 8)
    else:
        workload = make_workload(num_requests=args.num_requests)
    shape = MODEL_SHAPES[args.model]
    bandwidth = copy_bandwidth(args.device)
    results: dict[str, object] = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda")
                                      else "cpu", model=args.model, date=time.strftime("%Y-%m-%d"),
                                      num_requests=len(workload.prompts),
                                      num_prompt_tokens=workload.num_prompt_tokens,
                                      num_output_tokens=workload.num_output_tokens,
                                      copy_bandwidth_tb_s=bandwidth / 1e12)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_checkpoint(args.model, Path(tmp) / "model", device=args.device,
                                    dtype="bfloat16" if args.device.startswith("cuda") else "float32")
        weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        kv_bytes, w_bytes = roofline_bytes(workload, shape, weight_bytes)
        floor_s = (kv_bytes + w_bytes) / bandwidth
        results.update(roofline_s=floor_s, roofline_tok_s=workload.num_output_tokens / floor_s,
                       kv_read_tb=kv_bytes / 1e12, weight_read_tb=w_bytes / 1e12)
        if args.async_scheduling in ("off", "both"):
            results["ours_sync" if args.async_scheduling == "both" else "ours"] = run_ours(
                model_dir, workload, args, async_scheduling=False)
        if args.async_scheduling in ("on", "both"):
            results["ours"] = run_ours(model_dir, workload, args)
        if args.baselines:
            subset = Workload(workload.prompts[:args.baselines], workload.output_lens[:args.baselines])
            results["baseline_requests"] = len(subset.prompts)
            if not args.skip_static:
                results["hf_static"] = run_hf_static(model_dir, subset, args.device)
            if not args.skip_cb:
                try:
                    results["hf_continuous"] = run_hf_continuous(model_dir, subset, args.device)
                except Exception as exc:  # an HF API change must not lose our own figure
                    results["hf_continuous"] = dict(error=repr(exc))
    out_dir = Path(args.json).parent if args.json else Path(os.environ.get("OUT", "bench/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.json) if args.json else out_dir / f"throughput-{args.model}.json"
    out_path.write_text(json.dumps(results, indent=2))
    ours = results["ours"]
    assert isinstance(ours, dict)
    print(f"\nworkload: {results['num_requests']} requests, {workload.num_prompt_tokens} prompt + "
          f"{workload.num_output_tokens} output tokens; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'engine':<28}{'tok/s':>10}{'wall s':>10}{'of roofline':>13}")
    roof = float(results["roofline_tok_s"])  # type: ignore[arg-type]
    print(f"{'roofline':<28}{roof:>10.0f}{float(results['roofline_s']):>10.2f}{1.0:>13.2f}")  # type: ignore[arg-type]
    sync = results.get("ours_sync")
    if isinstance(sync, dict):
        print(f"{'tokenrelay sync':<28}{sync['tok_s']:>10.0f}{sync['wall_s']:>10.2f}{sync['tok_s'] / roof:>13.3f}")
    label = "tokenrelay" if args.async_scheduling != "off" else "tokenrelay sync"
    print(f"{label:<28}{ours['tok_s']:>10.0f}{ours['wall_s']:>10.2f}{ours['tok_s'] / roof:>13.3f}")
    for key, label in (("hf_static", "HF static (bs 64)"), ("hf_continuous", "HF continuous batching")):
        r = results.get(key)
        if isinstance(r, dict) and "tok_s" in r:
            print(f"{label + f' [{args.baselines} req]':<28}{r['tok_s']:>10.0f}{r['wall_s']:>10.2f}"
                  f"{r['tok_s'] / roof:>13.3f}")
        elif isinstance(r, dict):
            print(f"{label:<28} failed: {r.get('error')}")
    print(f"json: {out_path}")


if __name__ == "__main__":
    main()
