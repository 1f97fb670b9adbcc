"""Offline throughput: our engine in one or more configurations (one process, a fresh engine each), HF
static generate and HF continuous batching, side by side, against a roofline from the copy bandwidth
and bf16 matmul rate measured in the same run.

    python -m bench.throughput                                   # benchmark workload (GPU), Qwen3-0.6B shape
    python -m bench.throughput --workload prefill-heavy          # prompts 1024-4096 tokens, outputs 32-128
    python -m bench.throughput --model llama-3.2-1b              # the second shape, either workload
    python -m bench.throughput --kv-cache-dtype auto,fp8         # one row per KV cache dtype
    python -m bench.throughput --configs auto,auto:split=512,fp8 --repeats 3 --baselines 0
    python -m bench.throughput --quick                           # small smoke run (CPU or GPU)
    python -m bench.throughput --constrained-fraction 0.1 --baselines 0   # 10% of requests JSON-constrained
    python -m bench.throughput --model llama-3-70b --load-format dummy --tensor-parallel-size 4 --baselines 0

A config is `KV[:switch=value]...`: KV is auto or fp8; switches: split=N (decode partitions of at most N
tokens, TOKENRELAY_DECODE_MAX_PARTITION_TOKENS), causal=0 (prefill causal split off; on by default,
TOKENRELAY_PREFILL_CAUSAL_SPLIT), async=off (one step at a time). --repeats N times the workload N times
on each config's engine (prefix cache reset in between) and reports the median, min and max.

Rooflines: the decode floor (every output token reads its whole context's KV once, bf16 or fp8 plus
scales; the weights once per decode step, at the copy bandwidth); for the prefill-heavy workload the
prefill's FLOPs at the measured matmul rate are added (the benchmark workload's figure stays the decode
floor, as DESIGN.md quotes it; its prefill term is in the JSON). The prefill kernel is also timed alone
on one step's worth of the workload's prompts (max_num_batched_tokens fresh tokens) for its TFLOP/s.

Tensor parallel (--tensor-parallel-size N): the rooflines take N GPUs' bandwidth and matmul rate (each
reads its 1/N of the weights and the KV), and each run reports its tok/s per GPU too. --load-format dummy
makes the weights up on the GPUs (no checkpoint is written: a 70B shape needs no 140 GB file; no HF
baselines then).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.workload import (
    MODEL_SHAPES,
    WORKLOADS,
    Workload,
    attention_prefill_flops,
    make_checkpoint,
    make_workload,
    named_workload,
    num_parameters,
    prefill_flops,
    roofline_bytes,
    write_config_dir,
)

# Config switches -> the environment variable each sets (read once per engine; see engine/attention.py).
SWITCH_ENVS = {"split": "TOKENRELAY_DECODE_MAX_PARTITION_TOKENS", "causal": "TOKENRELAY_PREFILL_CAUSAL_SPLIT"}


@dataclass(frozen=True)
class RunConfig:
    label: str
    kv_cache_dtype: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    async_scheduling: bool = True

    @classmethod
    def parse(cls, spec: str) -> RunConfig:
        kv, *switches = spec.split(":")
        if kv not in ("auto", "fp8"):
            raise SystemExit(f"config {spec!r}: the KV cache dtype must be auto or fp8")
        env, async_scheduling = {}, True
        for switch in switches:
            name, _, value = switch.partition("=")
            if name == "async":
                async_scheduling = value != "off"
            elif name in SWITCH_ENVS:
                env[SWITCH_ENVS[name]] = value
            else:
                raise SystemExit(f"config {spec!r}: unknown switch {name!r} (split, causal, async)")
        return cls(spec, kv, env, async_scheduling)

    def apply(self) -> None:
        """Set this config's switches (clearing the others) before its engine is built."""
        for name in SWITCH_ENVS.values():
            if name in self.env:
                os.environ[name] = self.env[name]
            else:
                os.environ.pop(name, None)
        from engine.attention import get_attention_ops

        get_attention_ops.cache_clear()


def copy_bandwidth(device: str, num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    if not device.startswith("cuda"):
        return float("nan")
    src = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * num_bytes / _median_seconds(lambda: dst.copy_(src), warmup=3, reps=10)


def matmul_rate(device: str, n: int = 8192) -> float:
    """bf16 FLOP/s of an n x n x n matmul on random data (the rate prefill's GEMMs can approach)."""
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _median_seconds(lambda: a @ b, warmup=3, reps=10)


def _median_seconds(fn: Any, warmup: int, reps: int) -> float:
    """Median seconds of fn() by CUDA events (a host clock when CUDA is absent: interpreter tests)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def prefill_kernel_rate(shape: dict[str, object], workload: Workload, num_tokens: int, device: str,
                        kv_cache_dtype: str) -> dict[str, float]:
    """The prefill attention kernel alone (as the engine's ops run it, switches included) on one step:
    the workload's first prompts, fresh, num_tokens in all (the last one cut); TFLOP/s of its causal
    attention. The cache is filled through the engine's own write kernel."""
    from engine.attention import get_attention_ops

    lens: list[int] = []
    for prompt in workload.prompts:
        lens.append(min(len(prompt), num_tokens - sum(lens)))
        if sum(lens) == num_tokens:
            break
    heads, kv_heads, head_dim = (int(shape[k]) for k in  # type: ignore[call-overload]
                                 ("num_attention_heads", "num_key_value_heads", "head_dim"))
    block_size, total = 16, sum(lens)
    blocks = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks)
    kv_dtype = torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.bfloat16
    k_cache = torch.empty((num_blocks, kv_heads, block_size, head_dim), dtype=kv_dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    scales: tuple[torch.Tensor | None, ...] = (None, None)
    if kv_cache_dtype == "fp8":
        scales = tuple(torch.empty(k_cache.shape[:3], device=device) for _ in range(2))
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    table = torch.zeros((len(lens), max(blocks)), dtype=torch.int32, device=device)
    slots, start = [], 0
    for i, (n, b) in enumerate(zip(lens, blocks, strict=True)):
        table[i, :b] = perm[start:start + b]
        start += b
        pos = torch.arange(n, device=device)
        slots.append(table[i, pos // block_size].long() * block_size + pos % block_size)
    write_kv_cache, paged_attention = get_attention_ops("cuda")
    key = torch.randn(total, kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    write_kv_cache(key, torch.randn_like(key), k_cache, v_cache, torch.cat(slots), *scales)
    query = torch.randn(total, heads, head_dim, device=device, dtype=torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    seconds = _median_seconds(lambda: paged_attention(
        query, k_cache, v_cache, table, seq_lens, qsl, head_dim**-0.5, max(lens), max(lens), out=out,
        k_scale=scales[0], v_scale=scales[1]), warmup=3, reps=10)
    flops = attention_prefill_flops(lens, shape)
    return dict(num_tokens=float(total), num_seqs=float(len(lens)), time_us=seconds * 1e6,
                tflop_s=flops / seconds / 1e12)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(model_dir: Path, workload: Workload, args: argparse.Namespace, config: RunConfig) -> dict[str, Any]:
    """Build the engine for `config`, warm it up, then time the whole workload args.repeats times."""
    from engine import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine

    config.apply()
    engine = LLMEngine(EngineConfig(
        model=str(model_dir), device=args.device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization,
        async_scheduling=config.async_scheduling, kv_cache_dtype=config.kv_cache_dtype,  # type: ignore[arg-type]
        tensor_parallel_size=args.tensor_parallel_size, load_format=args.load_format))
    params = [SamplingParams(max_tokens=n, temperature=args.temperature, ignore_eos=True)
              for n in workload.output_lens]
    for i in _constrained_rows(len(params), args.constrained_fraction):
        params[i] = SamplingParams(max_tokens=params[i].max_tokens, temperature=args.temperature,
                                   structured_output=_array_schema(params[i].max_tokens))
    # Warm-up: a few requests through every path (prefill, decode, CUDA graph capture, a mixed step).
    from bench.timeline import warm_up
    warm_up(engine, workload.prompts[:4])
    walls: list[float] = []
    for _ in range(args.repeats):
        engine.scheduler.reset_prefix_cache()  # a timed run must not hit earlier runs' prompts
        _sync(args.device)
        t0 = time.perf_counter()
        outs = engine.generate(workload.prompts, params)
        _sync(args.device)
        walls.append(time.perf_counter() - t0)
        num_out = sum(len(o.token_ids) for o in outs)
        if num_out != workload.num_output_tokens and not args.constrained_fraction:
            raise RuntimeError(f"engine produced {num_out} tokens, expected {workload.num_output_tokens}")
    stats = engine.stats()
    # A constrained request ends where its grammar does (about its workload length): count what came.
    tok_s = [num_out / w for w in walls]
    result = dict(config=config.label, kv_cache_dtype=config.kv_cache_dtype, switches=config.env,
                  async_scheduling=config.async_scheduling, wall_s=statistics.median(walls), walls_s=walls,
                  tok_s=statistics.median(tok_s), tok_s_min=min(tok_s), tok_s_max=max(tok_s),
                  num_kv_blocks=engine.num_kv_blocks, num_steps=stats.num_steps / args.repeats,
                  preemptions=stats.num_preemptions, peak_kv_usage=engine.peak_kv_usage,
                  kv_waste_at_peak=engine.kv_waste_at_peak, tensor_parallel_size=args.tensor_parallel_size,
                  tok_s_per_gpu=statistics.median(tok_s) / args.tensor_parallel_size)
    engine.shutdown()  # the other ranks' processes free their GPUs before the next config's engine starts
    del engine, outs
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def _constrained_rows(num_requests: int, fraction: float) -> list[int]:
    """Rows spread evenly over the workload (every 1/fraction-th request)."""
    num = round(num_requests * fraction)
    return sorted({int(k * num_requests / num) for k in range(num)}) if num else []


def _array_schema(max_tokens: int) -> Any:
    """A JSON array of exactly max_tokens // 2 digits (about max_tokens tokens: a digit and a separator
    each), so a constrained request's length stays close to its unconstrained one."""
    from engine import StructuredOutputParams

    num_items = max(1, max_tokens // 2)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": num_items, "maxItems": num_items}
    return StructuredOutputParams("json_schema", json.dumps(schema))


def _json_capable_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """The benchmark checkpoint's word-level vocabulary ("t0".."tN") can spell no JSON: give ids 2..15
    the pieces of a digit array, so a grammar has tokens to allow. (The mask costs less than with a
    real 150k-token vocabulary, where more tokens need checking: a lower bound on the host's part.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["[", "]", ",", " ", ", ", *map(str, range(10))]
    vocab = {f"t{i}": i for i in range(vocab_size)}
    for i, piece in enumerate(pieces, start=2):
        del vocab[f"t{i}"]
        vocab[piece] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1").save_pretrained(model_dir)


def _hf_model(model_dir: Path, device: str) -> Any:
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


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    if args.configs:
        return [RunConfig.parse(spec) for spec in args.configs.split(",")]
    configs = []
    for kv in args.kv_cache_dtype.split(","):
        if args.async_scheduling in ("off", "both"):
            configs.append(RunConfig.parse(f"{kv}:async=off"))
        if args.async_scheduling in ("on", "both"):
            configs.append(RunConfig.parse(kv))
    return configs


def rooflines(workload: Workload, shape: dict[str, object], weight_bytes: int, bandwidth: float, matmul: float,
              kv_cache_dtype: str) -> dict[str, float]:
    kv_bytes, w_bytes = roofline_bytes(workload, shape, weight_bytes, kv_cache_dtype)
    decode_s = (kv_bytes + w_bytes) / bandwidth
    prefill_s = prefill_flops(workload, shape) / matmul
    return dict(decode_floor_s=decode_s, prefill_floor_s=prefill_s, kv_read_tb=kv_bytes / 1e12,
                weight_read_tb=w_bytes / 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--workload", default="benchmark", choices=sorted(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="32 short requests on the tiny model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8, or auto,fp8 (a row each)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated configs KV[:switch=value]... (overrides --kv-cache-dtype)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per config (median, min, max)")
    parser.add_argument("--baselines", type=int, default=64,
                        help="run the HF baselines on the first N requests (0 skips them)")
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--skip-cb", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the workload's longest prompt + output (2048, or 4224 prefill-heavy)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split across")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights made on the GPUs, no checkpoint written (no HF baselines)")
    parser.add_argument("--async-scheduling", choices=["on", "off", "both"], default="on",
                        help="both: each KV dtype twice, without then with (config label KV:async=off)")
    parser.add_argument("--write-workload-json", default=None,
                        help='write {"prompts", "output_lens"} here (vllm_offline.py --workload-json)')
    parser.add_argument("--constrained-fraction", type=float, default=0.0,
                        help="share of requests with a JSON-schema grammar (structured outputs), e.g. 0.1 or 1")
    parser.add_argument("--json", default=None, help="write the results here (default: $OUT or bench/out)")
    args = parser.parse_args()

    if args.quick:
        args.model = "tiny"
        (lo, hi), out_range = WORKLOADS[args.workload]
        scale = 64 / WORKLOADS["prefill-heavy"][0][1] if args.workload == "prefill-heavy" else 64 / 1024
        workload = make_workload(32, max(4, int(lo * scale)), int(hi * scale), max_token_id=4000,
                                 output_range=(max(2, int(out_range[0] * scale)), max(4, int(out_range[1] * scale))))
        args.baselines = min(args.baselines, 8)
    else:
        workload = named_workload(args.workload, args.num_requests)
    args.max_model_len = args.max_model_len or max(
        len(p) + n for p, n in zip(workload.prompts, workload.output_lens, strict=True))
    if args.write_workload_json:
        Path(args.write_workload_json).write_text(json.dumps(
            {"prompts": workload.prompts, "output_lens": workload.output_lens}))
    shape = MODEL_SHAPES[args.model]
    weight_bytes = num_parameters(shape) * (2 if args.device.startswith("cuda") else 4)
    if args.load_format == "auto" and weight_bytes > 32 << 30:
        raise SystemExit(f"{args.model} weighs {weight_bytes / 1e9:.0f} GB: pass --load-format dummy (random "
                         f"weights made on the GPUs) rather than writing that checkpoint")
    if args.load_format == "dummy":
        args.baselines = 0  # HF needs the checkpoint on disk
    configs = run_configs(args)
    tp = args.tensor_parallel_size
    # N GPUs read their shares at the same time: N times one GPU's copy and matmul rates.
    bandwidth, matmul = tp * copy_bandwidth(args.device), tp * matmul_rate(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the probes' buffers are gone: the engines size the KV pool from free memory
    results: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", model=args.model,
        workload=args.workload, date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
        num_requests=len(workload.prompts), num_prompt_tokens=workload.num_prompt_tokens,
        num_output_tokens=workload.num_output_tokens, max_model_len=args.max_model_len, repeats=args.repeats,
        tensor_parallel_size=tp, load_format=args.load_format, weight_bytes=weight_bytes,
        copy_bandwidth_tb_s=bandwidth / 1e12, matmul_tflop_s=matmul / 1e12, prefill_flops=prefill_flops(workload, shape),
        runs=[], prefill_kernel={})
    includes_prefill = args.workload == "prefill-heavy"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        if args.load_format == "dummy":
            write_config_dir(args.model, model_dir)
        else:
            make_checkpoint(args.model, model_dir, device=args.device,
                            dtype="bfloat16" if args.device.startswith("cuda") else "float32")
        if args.constrained_fraction:
            _json_capable_tokenizer(model_dir, int(shape["vocab_size"]))  # type: ignore[call-overload]
            results["constrained_fraction"] = args.constrained_fraction
        for kv in sorted({c.kv_cache_dtype for c in configs}):
            roof = rooflines(workload, shape, weight_bytes, bandwidth, matmul, kv)
            roof["roofline_s"] = roof["decode_floor_s"] + (roof["prefill_floor_s"] if includes_prefill else 0.0)
            roof["roofline_tok_s"] = workload.num_output_tokens / roof["roofline_s"]
            results[f"roofline_{kv}"] = roof
        for config in configs:
            run = run_ours(model_dir, workload, args, config)
            run["of_roofline"] = run["tok_s"] / results[f"roofline_{config.kv_cache_dtype}"]["roofline_tok_s"]
            results["runs"].append(run)
            if args.device.startswith("cuda") and config.async_scheduling:
                rate = prefill_kernel_rate(shape, workload, args.max_num_batched_tokens, args.device,
                                           config.kv_cache_dtype)
                rate["of_matmul"] = rate["tflop_s"] * 1e12 / matmul
                results["prefill_kernel"][config.label] = rate
                torch.cuda.empty_cache()
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
    out_path = (Path(args.json) if args.json else
                Path(os.environ.get("OUT", "bench/out")) / f"throughput-{args.model}-{args.workload}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print_table(results, args)
    print(f"json: {out_path}")


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{results['workload']} workload, {results['model']}: {results['num_requests']} requests, "
          f"{results['num_prompt_tokens']} prompt + {results['num_output_tokens']} output tokens; copy "
          f"{results['copy_bandwidth_tb_s']:.2f} TB/s, matmul {results['matmul_tflop_s']:.0f} TFLOP/s"
          f"{' (' + str(results['tensor_parallel_size']) + ' GPUs)' if results['tensor_parallel_size'] > 1 else ''}; "
          f"median of {args.repeats}")
    print(f"{'engine':<40}{'tok/s':>9}{'min':>9}{'max':>9}{'wall s':>9}{'of roofline':>13}{'tok/s/GPU':>11}")
    for kv in ("auto", "fp8"):
        roof = results.get(f"roofline_{kv}")
        if roof:
            terms = "prefill + decode floor" if results["workload"] == "prefill-heavy" else "decode floor"
            print(f"{f'roofline {kv} ({terms})':<40}{roof['roofline_tok_s']:>9.0f}{'':>18}"
                  f"{roof['roofline_s']:>9.2f}{1.0:>13.2f}")
    for run in results["runs"]:
        print(f"{'tokenrelay ' + run['config']:<40}{run['tok_s']:>9.0f}{run['tok_s_min']:>9.0f}"
              f"{run['tok_s_max']:>9.0f}{run['wall_s']:>9.2f}{run['of_roofline']:>13.3f}{run['tok_s_per_gpu']:>11.0f}")
    for key, label in (("hf_static", "HF static (bs 64)"), ("hf_continuous", "HF continuous batching")):
        r = results.get(key)
        if isinstance(r, dict) and "tok_s" in r:
            print(f"{label + f' [{args.baselines} req]':<40}{r['tok_s']:>9.0f}{'':>18}{r['wall_s']:>9.2f}")
        elif isinstance(r, dict):
            print(f"{label:<40} failed: {r.get('error')}")
    for label, rate in results["prefill_kernel"].items():
        print(f"prefill kernel [{label}]: {rate['tflop_s']:.0f} TFLOP/s = {rate['of_matmul']:.2f} of the matmul "
              f"rate ({int(rate['num_seqs'])} fresh prompts, {int(rate['num_tokens'])} tokens, one layer)")


if __name__ == "__main__":
    main()
