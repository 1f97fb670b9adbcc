"""Queue throughput against Redis Cluster masters and queue shards, on one machine: many fake-GPU workers
(bench/fake_gpu.py: the model call is a timed sleep) drain a backlog of jobs spread over the shards.

    python -m bench.cluster_queue --layouts 1x1,1x4,2x4,4x4 --workers 4 --jobs 2000 --max-tokens 32

A layout MxS is M masters (no replicas, `redis-cli --cluster create`) and TOKENRELAY_QUEUE_SHARDS=S.
Per layout: jobs/s and result events/s from the first XADD to the last acknowledgement, the shard ->
master map, and each redis-server's and worker's CPU seconds (from /proc), which show where a small box
saturates. Writes bench/results/cluster-queue-<tag>.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from api_client.keys import JOB_FIELD, Keys
from tests.helpers.redis_cluster import LocalCluster
from tests.helpers.tiny_models import make_tiny_model

PREFIX = "bench"
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (and its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def start_worker(url: str, model: Path, keys: Keys, name: str, args: argparse.Namespace, log_dir: Path,
                 ) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    settings = {"redis_url": url, "redis_cluster": "true", "queue_shards": keys.num_shards, "prefix": PREFIX,
                "consumer": name, "model": str(model), "device": "cpu", "metrics_port": 0, "lease_s": 120,
                "engine_process": "false", "max_num_seqs": args.max_num_seqs, "num_kv_blocks": 1024,
                "max_num_batched_tokens": 2048, "max_model_len": 256, "result_ttl_s": 600}
    env.update({f"TOKENRELAY_{k.upper()}": str(v) for k, v in settings.items()})
    env["TOKENRELAY_BENCH_FAKE_GPU"] = args.fake_gpu
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "bench.fake_gpu"], env=env,
                            stdout=(log_dir / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)


def group_counts(client: Any, keys: Keys) -> tuple[int, int]:
    """(entries read, pending) over every shard."""
    read = pending = 0
    for shard in keys.shards:
        for g in client.xinfo_groups(shard.jobs):
            read += int(g.get("entries-read") or 0)
            pending += int(g["pending"])
    return read, pending


def run_layout(num_masters: int, num_shards: int, model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    keys = Keys(PREFIX, num_shards=num_shards, cluster=True)
    with LocalCluster(num_masters=num_masters, replicas=0) as cluster:
        client = cluster.client()
        shard_to_master = {s.index: cluster.master_of(s.jobs).port for s in keys.shards}
        log_dir = work / f"{num_masters}x{num_shards}"
        log_dir.mkdir()
        workers = [start_worker(cluster.url, model, keys, f"w{i}", args, log_dir) for i in range(args.workers)]
        try:
            deadline = time.monotonic() + 300
            # "worker ready": model loaded and serving (the heartbeat is written earlier, before the load).
            while sum("worker ready" in (log_dir / f"w{i}.log").read_text(errors="replace")
                      for i in range(args.workers)) < args.workers:
                if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                    raise SystemExit(f"workers did not start: see {log_dir}")
                time.sleep(0.2)
            nodes_cpu0 = {n.port: cpu_s(n.process.pid) for n in cluster.nodes if n.process}
            workers_cpu0 = sum(cpu_s(w.pid) for w in workers)
            params = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            started = time.monotonic()
            pipe = client.pipeline()
            for i in range(args.jobs):
                job_id = f"b{i}"
                job = {"id": job_id, "prompt_token_ids": [5 + i % 50] * 16, "params": params}
                pipe.xadd(keys.for_job(job_id).jobs, {JOB_FIELD: json.dumps(job)})
            pipe.execute()
            while True:
                read, pending = group_counts(client, keys)
                if read >= args.jobs and pending == 0:
                    break
                if time.monotonic() - started > args.timeout_s:
                    raise SystemExit(f"not drained in {args.timeout_s} s (read {read}, pending {pending})")
                time.sleep(0.05)
            elapsed = time.monotonic() - started
            nodes_cpu = {port: round(cpu_s(n.process.pid) - nodes_cpu0[port], 1)
                         for n in cluster.nodes if n.process for port in [n.port]}
            workers_cpu = round(sum(cpu_s(w.pid) for w in workers) - workers_cpu0, 1)
            pipe = client.pipeline()
            for i in range(args.jobs):
                pipe.xlen(keys.result(f"b{i}"))
            num_events = sum(pipe.execute())
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    w.kill()
            client.close()
    return {"masters": num_masters, "shards": num_shards, "workers": args.workers, "jobs": args.jobs,
            "elapsed_s": round(elapsed, 2), "jobs_per_s": round(args.jobs / elapsed, 1),
            "events_per_s": round(num_events / elapsed, 1), "tokens_per_s": round(args.jobs * args.max_tokens / elapsed),
            "shard_to_master": shard_to_master, "redis_cpu_s": nodes_cpu, "workers_cpu_s": workers_cpu,
            "box_cpu_share": round((sum(nodes_cpu.values()) + workers_cpu) / (elapsed * (os.cpu_count() or 1)), 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="1x1,1x4,2x4,4x4", help="comma-separated MASTERSxSHARDS")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--fake-gpu", default="7,10", help="base ms per step, us per token (bench/fake_gpu.py)")
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tokenrelay-bench-cluster-"))
    model = make_tiny_model("qwen3", work / "model")
    rows = []
    for layout in args.layouts.split(","):
        masters, _, shards = layout.partition("x")
        row = run_layout(int(masters), int(shards), model, args, work)
        rows.append(row)
        print(f"{row['masters']} masters x {row['shards']} shards, {row['workers']} workers: "
              f"{row['jobs_per_s']} jobs/s, {row['events_per_s']} events/s, {row['tokens_per_s']} tok/s "
              f"({row['elapsed_s']} s; redis cpu {row['redis_cpu_s']}, workers cpu {row['workers_cpu_s']} s, "
              f"box {row['box_cpu_share']:.0%} busy; shards->masters {row['shard_to_master']})", flush=True)
    report = {"command": " ".join(["python -m bench.cluster_queue", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "fake_gpu": args.fake_gpu, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cluster-queue-{args.tag}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
