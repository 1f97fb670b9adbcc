"""Start-up time: seconds from `python -m worker` (or a bare engine) to the first job served, cold and warm.

    python -m bench.startup                          # GPU, Qwen3-0.6B shape; worker mode when Redis is there
    python -m bench.startup --mode engine            # the engine alone: no Redis, no worker
    python -m bench.startup --model tiny --device cpu  # CPU smoke run

Each start is a fresh process. "cold" runs with an empty Triton cache (TRITON_CACHE_DIR in a new
directory: every kernel is compiled); "warm" is the second start with that cache filled. Neither caches
CUDA graphs (they are captured at every start, so graph_capture is paid warm too), the CUDA context or
cuBLAS handles; the checkpoint was just written, so the OS page cache holds it in both runs.

worker mode: a job (one token) is queued before the worker starts, so "ready" is the moment its done
event lands in its result stream: the first job can be (and was) served. engine mode: LLMEngine built,
then one one-token generate. Phases come from the engine's `startup phase=... s=...` log lines:
before model load (interpreter, imports, settings, Redis, the engine core process), model_load,
kv_profile (the profile forward that sizes the KV pool), graph_capture; "rest" is what remains (KV
allocation, tokenizer, worker start, the job itself).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

PHASES = ("model_load", "kv_profile", "graph_capture")
_PHASE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*startup phase=(\w+) s=([\d.]+)", re.M)

_ENGINE_CHILD = """
import json, logging, os, sys, time
logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
engine = LLMEngine(EngineConfig(model=os.environ["TOKENRELAY_MODEL"], device=os.environ["TOKENRELAY_DEVICE"]))
engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1, ignore_eos=True))
print(json.dumps({"ready_at": time.time()}))
"""


def parse_phases(log: str, spawned_at: float) -> dict[str, float]:
    """Phase seconds from the log, plus before_model_load_s: spawn to the start of the model load (the
    model_load line's timestamp minus its duration)."""
    phases: dict[str, float] = {}
    for stamp, phase, seconds in _PHASE_LINE.findall(log):
        phases[f"{phase}_s"] = float(seconds)
        if phase == "model_load":
            logged_at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            phases["before_model_load_s"] = logged_at - float(seconds) - spawned_at
    return phases


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_engine(env: dict[str, str], timeout_s: float) -> tuple[float, str]:
    """(seconds to ready, stderr) of a bare engine process."""
    spawned_at = time.time()
    proc = subprocess.run([sys.executable, "-c", _ENGINE_CHILD], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"engine process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ready_at = json.loads(proc.stdout.strip().splitlines()[-1])["ready_at"]
    return ready_at - spawned_at, proc.stderr


def start_worker(env: dict[str, str], redis_url: str, prefix: str, timeout_s: float) -> tuple[float, str]:
    """(seconds to the first job's done event, stderr) of `python -m worker --burst`."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    job_id = f"{prefix}-first"
    client.xadd(f"{prefix}:jobs", {"job": json.dumps(
        {"id": job_id, "prompt_token_ids": [1, 2, 3, 4], "params": {"max_tokens": 1, "ignore_eos": True}})})
    env = {**env, "TOKENRELAY_REDIS_URL": redis_url, "TOKENRELAY_PREFIX": prefix, "TOKENRELAY_METRICS_PORT": "0",
           "TOKENRELAY_CONSUMER": prefix}
    log_path = Path(tempfile.mkstemp(prefix="startup-", suffix=".log")[1])
    with log_path.open("w") as log:
        spawned_at = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--burst"], env=env, stderr=log,
                                stdout=subprocess.DEVNULL)
        stream, last_id, ready_s = f"{prefix}:result:{job_id}", "0-0", None
        try:
            while ready_s is None:
                if time.time() - spawned_at > timeout_s or proc.poll() is not None:
                    raise RuntimeError(f"worker served nothing (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
                for _, entries in client.xread({stream: last_id}, block=50) or []:
                    for entry_id, fields in entries:
                        last_id = entry_id
                        if json.loads(fields["event"])["type"] in ("done", "error"):
                            ready_s = time.time() - spawned_at
            proc.wait(timeout=60)  # burst: it stops once the queue is empty
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    log_path.unlink()
    return ready_s, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-0.6b", help="a bench/workload.py shape")
    parser.add_argument("--model-dir", default=None, help="a checkpoint instead of a random shape")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--mode", choices=["auto", "worker", "engine"], default="auto",
                        help="auto: worker when redis-py and redis-server are there, else engine")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    from bench.workload import make_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mode = args.mode
    if mode == "auto":
        try:
            import redis  # noqa: F401
            mode = "worker" if shutil.which("redis-server") else "engine"
        except ImportError:
            mode = "engine"
    results: dict[str, Any] = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                                   model=args.model_dir or args.model, mode=mode, date=time.strftime("%Y-%m-%d"),
                                   runs={})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else make_checkpoint(
            args.model, Path(tmp) / "model", device=device,
            dtype="bfloat16" if device.startswith("cuda") else "float32")
        env = {**os.environ, "TOKENRELAY_MODEL": str(model_dir), "TOKENRELAY_DEVICE": device,
               "TRITON_CACHE_DIR": str(Path(tmp) / "triton-cache")}
        server = None
        if mode == "worker":
            port = _free_port()
            server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL)
            time.sleep(0.5)
        try:
            for run in ("cold", "warm"):
                spawned_at = time.time()
                if mode == "worker":
                    ready_s, log = start_worker(env, f"redis://127.0.0.1:{port}/0", f"startup-{run}", args.timeout_s)
                else:
                    ready_s, log = start_engine(env, args.timeout_s)
                phases = parse_phases(log, spawned_at)
                rest = ready_s - sum(phases.get(f"{p}_s", 0.0) for p in (*PHASES, "before_model_load"))
                results["runs"][run] = dict(ready_s=ready_s, **phases, rest_s=rest)
        finally:
            if server is not None:
                server.terminate()
                server.wait()
    out_path = Path(args.json) if args.json else Path(os.environ.get("OUT", "bench/out")) / "startup.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    print(f"\nstart-up to the first job served ({mode} mode, {results['model']}, {results['device']})")
    columns = ("ready_s", "before_model_load_s", "model_load_s", "kv_profile_s", "graph_capture_s", "rest_s")
    print(f"{'run':<6}" + "".join(f"{c[:-2]:>19}" for c in columns))
    for run, row in results["runs"].items():
        print(f"{run:<6}" + "".join(f"{row.get(c, float('nan')):>19.2f}" for c in columns))
    print(f"json: {out_path}")


if __name__ == "__main__":
    main()
