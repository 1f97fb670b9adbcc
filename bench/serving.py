"""Serving benchmark: Poisson arrivals (or a burst) through Redis to a `python -m worker`, measured the way a
client sees it; sweeps offered load, waiting_served_ratio and the token budget; draws PNG plots.

    python -m bench.serving --quick                  # CPU smoke run: tiny model, own redis-server + worker
    python -m bench.serving                          # GPU: Qwen3-0.6B shape, the DESIGN.md workload
    python -m bench.serving --rate 4 --no-sweep      # one run at 4 requests/s
    python -m bench.serving --redis-url redis://h:6379/0 --no-worker --prefix tokenrelay --model-dir /m

Queue overhead = end-to-end throughput at saturation (a burst) / the offline engine's LLMEngine.generate on
the same workload and engine knobs, in the same run. TTFT, TPOT and end-to-end latency are client-side
(job XADD -> event read back); queue wait is the worker's own `queue_ms` (XADD -> engine admission)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.workload import Workload, make_checkpoint, make_workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN_TIMEOUT_S = 1800.0
_QUEUE_MS = re.compile(r"job=(\S+) event=start .*queue_ms=(\d+)")


# ---- infrastructure: a redis-server and a worker of our own ------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(work_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH: install it, or pass --redis-url and --no-worker")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(work_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    probe = redis.Redis(port=port, socket_connect_timeout=1)
    for _ in range(200):
        try:
            if probe.ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


@dataclass
class WorkerKnobs:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_kv_blocks: int | None
    waiting_served_ratio: float | None = None
    max_waiting_steps: int | None = None

    def engine_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def start_worker(args: argparse.Namespace, redis_url: str, prefix: str, knobs: WorkerKnobs,
                 log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    settings = {"redis_url": redis_url, "prefix": prefix, "consumer": "bench", "model": args.model_dir,
                "device": args.device, "metrics_port": 0, "lease_s": 120, "result_ttl_s": 600,
                **knobs.engine_kwargs()}
    if args.engine_process != "auto":
        settings["engine_process"] = args.engine_process == "on"
    env.update({f"TOKENRELAY_{k.upper()}": str(v) for k, v in settings.items()})
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    if args.torch_threads is not None:  # torch's intra-op pool reads it at import
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    module = "worker"
    if args.fake_gpu is not None:  # the same worker with the model call replaced (bench/fake_gpu.py)
        from bench.fake_gpu import ENV

        env[ENV] = args.fake_gpu
        module = "bench.fake_gpu"
    return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT)


def wait_ready(redis_url: str, prefix: str, proc: subprocess.Popen[bytes] | None, log_path: Path | None) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 300
    while not client.exists(f"{prefix}:worker:bench" if proc is not None else f"{prefix}:jobs"):
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the worker exited: {log_path.read_text()[-2000:] if log_path else ''}")
        if time.monotonic() > deadline:
            raise SystemExit("no worker heartbeat within 300 s")
        time.sleep(0.1)


# ---- one run: arrivals, reads, timings ---------------------------------------------------------
@dataclass
class Timing:
    submit_s: float
    num_tokens: int = 0
    first_s: float | None = None
    done_s: float | None = None


@dataclass
class RunResult:
    label: str
    run_id: str  # prefix of the run's job ids
    offered_rate: float  # requests/s (inf: a burst)
    wall_s: float
    num_output_tokens: int
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    queue_s: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.num_output_tokens / self.wall_s

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(label=self.label, offered_rate=self.offered_rate, wall_s=self.wall_s,
                                   tok_s=self.tok_s, req_s=len(self.e2e_s) / self.wall_s)
        for name in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
            values = getattr(self, name)
            for q in (50, 90, 99):
                out[f"{name.removesuffix('_s')}_p{q}_ms"] = percentile(values, q) * 1000 if values else None
        return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def run_load(redis_url: str, prefix: str, workload: Workload, rate: float, label: str, seed: int,
                   progress: Any) -> RunResult:
    """Submit every request at Poisson times of `rate` per second (all at once when rate is inf) and read
    every result stream back on one connection (XREAD over all open streams)."""
    from redis.asyncio import Redis

    from api_client.schema import parse_event

    writer, reader = Redis.from_url(redis_url), Redis.from_url(redis_url)
    rng = random.Random(seed)
    run_id = re.sub(r"[^A-Za-z0-9_.:-]", "_", label) + f"-{time.time_ns()}"  # a valid job id prefix
    job_ids = [f"{run_id}-{i}" for i in range(len(workload.prompts))]
    timings: dict[str, Timing] = {}
    cursors: dict[str, str] = {}

    async def produce() -> None:
        next_s = time.perf_counter()
        for job_id, prompt, n in zip(job_ids, workload.prompts, workload.output_lens, strict=True):
            if math.isfinite(rate):
                next_s += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, next_s - time.perf_counter()))
            job = {"id": job_id, "prompt_token_ids": prompt, "result_ttl_s": 600,
                   "params": {"max_tokens": n, "temperature": 0, "ignore_eos": True}}
            timings[job_id] = Timing(submit_s=time.perf_counter())
            cursors[f"{prefix}:result:{job_id}"] = "0-0"
            await writer.xadd(f"{prefix}:jobs", {"job": json.dumps(job)})

    async def consume() -> None:
        num_done = 0
        while num_done < len(job_ids):
            if not cursors:
                await asyncio.sleep(0.001)
                continue
            streams: dict[Any, Any] = dict(cursors)
            reply: Any = await reader.xread(streams, block=100)
            now = time.perf_counter()
            for raw_key, entries in reply or []:
                key = raw_key.decode()
                job_id = key.rsplit(":", 1)[1]
                cursors[key] = entries[-1][0].decode()
                timing = timings[job_id]
                for _, fields in entries:
                    event = parse_event(fields[b"event"])
                    if event.type == "token":
                        timing.first_s = timing.first_s or now
                        timing.num_tokens += len(event.token_ids)
                    else:
                        if event.type == "error":
                            raise RuntimeError(f"job {job_id} failed: {event}")
                        timing.done_s = now
                        num_done += 1
                        cursors.pop(key, None)
                        progress.update(1)

    t0 = time.perf_counter()
    # A lost job must end the run, not hang it: the whole run gets a generous time limit.
    await asyncio.wait_for(asyncio.gather(produce(), consume()), RUN_TIMEOUT_S)
    wall = time.perf_counter() - t0
    await writer.aclose()
    await reader.aclose()
    result = RunResult(label, run_id, rate, wall, sum(t.num_tokens for t in timings.values()))
    for t in timings.values():
        assert t.first_s is not None and t.done_s is not None
        result.ttft_s.append(t.first_s - t.submit_s)
        result.e2e_s.append(t.done_s - t.submit_s)
        if t.num_tokens > 1:
            result.tpot_s.append((t.done_s - t.first_s) / (t.num_tokens - 1))
    return result


def add_queue_waits(result: RunResult, log_path: Path | None) -> None:
    """The worker's own XADD -> admission wait, from its `event=start ... queue_ms=` log lines."""
    if log_path is None or not log_path.exists():
        return
    for match in _QUEUE_MS.finditer(log_path.read_text(errors="replace")):
        if match.group(1).startswith(result.run_id + "-"):
            result.queue_s.append(int(match.group(2)) / 1000)


# ---- the offline reference ----------------------------------------------------------------------
def offline_tok_s(args: argparse.Namespace, knobs: WorkerKnobs, workload: Workload) -> float:
    """LLMEngine.generate on the same workload and knobs (after a warm-up): output tokens per second."""
    from engine import EngineConfig, SamplingParams
    from engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=args.model_dir, device=args.device, **knobs.engine_kwargs()))
    engine.generate(workload.prompts[:4], SamplingParams(max_tokens=8, ignore_eos=True))
    engine.scheduler.reset_prefix_cache()
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in workload.output_lens]
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(workload.prompts, params)
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del engine
    if args.device.startswith("cuda"):
        import gc

        import torch

        gc.collect()  # the engine's CUDA graphs and cache must be gone before the worker sizes its pool
        torch.cuda.empty_cache()
    return sum(len(o.token_ids) for o in outs) / wall


# ---- plots ------------------------------------------------------------------------------------------
def draw_plots(report: dict[str, Any], tag: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    title = f"{report['model']} on {report['device']}, {report['num_requests']} requests"

    load = report["load_sweep"]
    if load:
        fig, ax = plt.subplots(figsize=(6, 4))
        x = [r["offered_rate"] for r in load]
        for key, style in (("e2e_p50_ms", "o-"), ("e2e_p90_ms", "o--"), ("ttft_p50_ms", "s-"),
                           ("ttft_p90_ms", "s--")):
            ax.plot(x, [r[key] for r in load], style, label=key.replace("_ms", ""))
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.axvline(report["saturation_req_s"], color="grey", lw=0.8, ls=":", label="saturation (burst)")
        ax.set_title(f"latency vs offered load\n{title}", fontsize=9)
        ax.legend(fontsize=8)
        paths.append(_save(fig, f"serving-{tag}-latency-vs-load.png"))

    for sweep, xlabel in (("ratio_sweep", "waiting_served_ratio (0: admit always)"),
                          ("budget_sweep", "max_num_batched_tokens")):
        rows = report[sweep]
        if not rows:
            continue
        fig, ax1 = plt.subplots(figsize=(6, 4))
        x = [r["knob"] for r in rows]
        ax1.plot(x, [r["ttft_p50_ms"] for r in rows], "o-", color="tab:blue", label="TTFT p50")
        ax1.plot(x, [r["ttft_p90_ms"] for r in rows], "o--", color="tab:blue", label="TTFT p90")
        ax1.set_xlabel(xlabel)
        ax1.set_ylabel("TTFT (ms)", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(x, [r["tpot_p50_ms"] for r in rows], "s-", color="tab:red", label="TPOT p50")
        ax2.plot(x, [r["tpot_p90_ms"] for r in rows], "s--", color="tab:red", label="TPOT p90")
        ax2.set_ylabel("TPOT (ms)", color="tab:red")
        if sweep == "budget_sweep":
            ax1.set_xscale("log", base=2)
        rate = rows[0]["offered_rate"]
        ax1.set_title(f"TTFT / TPOT vs {sweep.split('_')[0]} at {rate:.2f} req/s\n{title}", fontsize=9)
        fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88), fontsize=8, ncol=2)
        paths.append(_save(fig, f"serving-{tag}-{sweep.split('_')[0]}.png"))
    return paths


def _save(fig: Any, name: str) -> Path:
    path = RESULTS_DIR / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---- the driver --------------------------------------------------------------------------------------
class _NoBar:
    def __init__(self, **_: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=f"{desc:<18}", unit="req", leave=True, dynamic_ncols=True)


class Bench:
    """Owns the Redis and worker processes of one benchmark invocation and runs loads through them."""

    def __init__(self, args: argparse.Namespace, redis_url: str, work_dir: Path) -> None:
        self.args = args
        self.redis_url = redis_url
        self.work_dir = work_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.prefix = args.prefix
        self.num_workers = 0

    def use_worker(self, knobs: WorkerKnobs) -> None:
        if self.args.no_worker:
            return
        self.stop_worker()
        self.num_workers += 1
        self.prefix = f"{self.args.prefix}-{os.getpid()}-{self.num_workers}"  # a clean queue per worker
        self.log_path = self.work_dir / f"worker-{self.num_workers}.log"
        self.proc = start_worker(self.args, self.redis_url, self.prefix, knobs, self.log_path)
        wait_ready(self.redis_url, self.prefix, self.proc, self.log_path)
        asyncio.run(run_load(self.redis_url, self.prefix, self.warmup, math.inf, "warmup", 0, _NoBar()))

    def stop_worker(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        self.proc = None

    def run(self, workload: Workload, rate: float, label: str) -> RunResult:
        bar = progress_bar(len(workload.prompts), label)
        try:
            result = asyncio.run(run_load(self.redis_url, self.prefix, workload, rate, label, self.args.seed, bar))
        finally:
            bar.close()
        add_queue_waits(result, self.log_path)
        return result

    @property
    def warmup(self) -> Workload:
        return make_workload(num_requests=4, min_len=8, max_len=16, max_token_id=self.args.max_token_id, seed=99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 96 short requests")
    p.add_argument("--model", default=None, help="bench.workload shape (default qwen3-0.6b; tiny with --quick)")
    p.add_argument("--model-dir", default=None, help="serve this checkpoint instead of a random one")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cpu with --quick)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--min-len", type=int, default=None, help="prompt and output lengths: uniform in [min, max]")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="one run at this many requests/s (Poisson)")
    p.add_argument("--burst", action="store_true", help="one run with every request sent at once")
    p.add_argument("--no-sweep", action="store_true", help="skip the load / ratio / budget sweeps")
    p.add_argument("--load-fractions", default=None,
                   help="comma-separated fractions of the saturation rate for the load sweep (e.g. 0.5)")
    p.add_argument("--no-knob-sweeps", action="store_true", help="skip the waiting_served_ratio / budget sweeps")
    p.add_argument("--sweeps", default="load,ratio,budget", help=(
        "which sweeps run (comma list of load, ratio, budget): one device call may not fit them all"))
    p.add_argument("--redis-url", default=None, help="use this Redis (default: start a redis-server)")
    p.add_argument("--no-worker", action="store_true", help="an external worker serves --prefix (no knob sweeps)")
    p.add_argument("--prefix", default="bench")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=None, help=(
        "torch CPU threads of the worker and the offline engine (default: torch's, one per core); on a small "
        "CPU box the worker's pool competes with Redis and the client, so 1 can be much faster"))
    p.add_argument("--engine-process", choices=["auto", "on", "off"], default="auto", help=(
        "the worker's TOKENRELAY_ENGINE_PROCESS (auto: the worker's default, on)"))
    p.add_argument("--compare-engine-modes", action="store_true", help=(
        "also run the burst with the engine loop in a thread and in a child process, side by side"))
    p.add_argument("--fake-gpu", nargs="?", const="7,10", default=None, metavar="BASE_MS,US_PER_TOKEN", help=(
        "CPU stand-in for a GPU: the model call sleeps BASE_MS + US_PER_TOKEN x scheduled tokens per "
        "step (default 7,10 ~ the H100 figures) and the full workload runs at batch 256 "
        "(bench/fake_gpu.py)"))
    p.add_argument("--json", default=None, help="write the report here (default: $OUT or bench/out)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.fake_gpu is not None:
        if quick:
            raise SystemExit("--fake-gpu runs the full workload: drop --quick")
        args.device = args.device or "cpu"
        args.model = args.model or "tiny"
    defaults: dict[str, Any] = dict(
        model="tiny" if quick else "qwen3-0.6b", num_requests=96 if quick else 256, min_len=8 if quick else 100,
        max_len=64 if quick else 1024, max_num_seqs=16 if quick else 256,
        max_num_batched_tokens=256 if quick else 16384, max_model_len=160 if quick else 2048,
        num_kv_blocks=256 if quick else None)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device is None:
        import torch

        args.device = "cpu" if quick or not torch.cuda.is_available() else "cuda"
    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    args.max_token_id = 4000 if args.model == "tiny" else 10000
    if args.load_fractions is not None:
        args.load_fractions = [float(f) for f in args.load_fractions.split(",")]
    else:
        args.load_fractions = [0.25, 0.5, 0.75, 1.0, 1.5] if quick else [0.25, 0.5, 0.75, 0.9, 1.0, 1.25]
    args.ratios = [0.0, 0.5, 1.2, 3.0] if quick else [0.0, 0.3, 1.2, 3.0]
    args.budgets = [32, 64, 128, 256] if quick else [2048, 4096, 8192, 16384]
    args.sweep_fraction = 0.75  # knob sweeps run at this fraction of the saturation rate
    args.sweeps = {name.strip() for name in args.sweeps.split(",") if name.strip()}
    unknown = args.sweeps - {"load", "ratio", "budget"}
    if unknown:
        raise SystemExit(f"--sweeps: unknown {sorted(unknown)}; choose from load, ratio, budget")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = make_workload(num_requests=args.num_requests, min_len=args.min_len, max_len=args.max_len,
                             max_token_id=args.max_token_id, seed=args.seed)
    knobs = WorkerKnobs(args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len, args.num_kv_blocks)
    report: dict[str, Any] = dict(
        model=args.model, device=args.device, date=time.strftime("%Y-%m-%d"), num_requests=len(workload.prompts),
        num_prompt_tokens=workload.num_prompt_tokens, num_output_tokens=workload.num_output_tokens,
        knobs=knobs.engine_kwargs(), torch_threads=args.torch_threads, command="python -m bench.serving " + " ".join(sys.argv[1:]),
        load_sweep=[], ratio_sweep=[], budget_sweep=[])
    with tempfile.TemporaryDirectory(prefix="tokenrelay-serving-") as tmp:
        work_dir = Path(tmp)
        redis_proc = None
        if args.redis_url is None:
            if args.no_worker:
                raise SystemExit("--no-worker needs --redis-url (where the external worker listens)")
            redis_proc, args.redis_url = start_redis(work_dir)
        if args.model_dir is None and not args.no_worker:
            dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
            args.model_dir = str(make_checkpoint(args.model, work_dir / "model", device=args.device, dtype=dtype))
        bench = Bench(args, args.redis_url, work_dir)
        try:
            if args.fake_gpu is not None:
                from bench.fake_gpu import install

                install(args.fake_gpu)  # the offline reference runs the same fake step
                report["fake_gpu"] = args.fake_gpu
            if args.model_dir is not None:
                report["offline_tok_s"] = offline_tok_s(args, knobs, workload)
                print(f"offline LLMEngine.generate: {report['offline_tok_s']:.0f} tok/s", file=sys.stderr)
            bench.use_worker(knobs)
            burst = bench.run(workload, math.inf, "burst")
            report["burst"] = burst.summary()
            report["saturation_req_s"] = sat = burst.summary()["req_s"]
            if "offline_tok_s" in report:
                report["queue_overhead_ratio"] = burst.tok_s / report["offline_tok_s"]
            if args.rate is not None:
                report["load_sweep"].append(bench.run(workload, args.rate, f"rate {args.rate:g}").summary())
            elif not (args.no_sweep or args.burst) and "load" in args.sweeps:
                for fraction in args.load_fractions:
                    rate = fraction * sat
                    report["load_sweep"].append(bench.run(workload, rate, f"load {fraction:.0%}").summary())
            if not (args.no_sweep or args.burst or args.no_worker or args.no_knob_sweeps):
                rate = args.sweep_fraction * sat
                for ratio in args.ratios if "ratio" in args.sweeps else []:
                    bench.use_worker(WorkerKnobs(**{**knobs.__dict__, "waiting_served_ratio": ratio or None,
                                                    "max_waiting_steps": 20 if ratio else None}))
                    row = bench.run(workload, rate, f"ratio {ratio:g}").summary()
                    report["ratio_sweep"].append({**row, "knob": ratio})
                for budget in args.budgets if "budget" in args.sweeps else []:
                    bench.use_worker(WorkerKnobs(**{**knobs.__dict__, "max_num_batched_tokens": budget}))
                    row = bench.run(workload, rate, f"budget {budget}").summary()
                    report["budget_sweep"].append({**row, "knob": budget})
            if args.compare_engine_modes and not args.no_worker:
                report["burst_by_engine_mode"] = {}
                for mode in ("off", "on"):
                    args.engine_process = mode
                    bench.use_worker(knobs)
                    report["burst_by_engine_mode"][mode] = bench.run(workload, math.inf, f"burst ep={mode}").summary()
        finally:
            bench.stop_worker()
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(30)
    tag = "quick" if args.quick else f"{args.model}-{args.device.split(':')[0]}"
    if args.fake_gpu is not None:
        tag = f"fake-gpu-{args.model}"
    report["plots"] = [str(p) for p in draw_plots(report, tag)]
    out_path = Path(args.json) if args.json else Path(os.environ.get("OUT", "bench/out")) / f"serving-{tag}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print_report(report, out_path)


def print_report(report: dict[str, Any], out_path: Path) -> None:
    print(f"\n{report['model']} on {report['device']}: {report['num_requests']} requests, "
          f"{report['num_prompt_tokens']} prompt + {report['num_output_tokens']} output tokens; knobs {report['knobs']}")
    if "offline_tok_s" in report:
        print(f"offline LLMEngine.generate {report['offline_tok_s']:.0f} tok/s; through Redis at saturation "
              f"{report['burst']['tok_s']:.0f} tok/s: queue overhead ratio {report['queue_overhead_ratio']:.3f}")
    for mode, row in report.get("burst_by_engine_mode", {}).items():
        ratio = f" = {row['tok_s'] / report['offline_tok_s']:.3f} of offline" if "offline_tok_s" in report else ""
        print(f"burst with engine_process={mode}: {row['tok_s']:.0f} tok/s{ratio}, TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
              f"TPOT p50 {row['tpot_p50_ms']:.0f} ms")
    header = (f"{'run':<14}{'req/s in':>9}{'tok/s':>8}{'TTFT p50/p90/p99 ms':>22}{'TPOT p50/p90/p99 ms':>22}"
              f"{'E2E p50/p90/p99 ms':>24}{'queue p50/p99 ms':>18}")
    print(header)
    rows = [report["burst"], *report["load_sweep"], *report["ratio_sweep"], *report["budget_sweep"]]
    for r in rows:
        rate = "burst" if math.isinf(r["offered_rate"]) else f"{r['offered_rate']:.2f}"
        print(f"{r['label']:<14}{rate:>9}{r['tok_s']:>8.0f}{_trio(r, 'ttft'):>22}{_trio(r, 'tpot'):>22}"
              f"{_trio(r, 'e2e'):>24}{_trio(r, 'queue', (50, 99)):>18}")
    print(f"json: {out_path}")
    for plot in report["plots"]:
        print(f"plot: {plot}")


def _trio(row: dict[str, Any], name: str, qs: tuple[int, ...] = (50, 90, 99)) -> str:
    values = [row[f"{name}_p{q}_ms"] for q in qs]
    return "/".join("-" if v is None else f"{v:.0f}" for v in values)


if __name__ == "__main__":
    main()
