"""The worker's token-publishing script against Redis Cluster masters, without an engine: what the Redis
side of a fleet can take, per master count.

    python -m bench.cluster_publish --masters 1,2,4 --shards 4 --clients 4 --seconds 8

Each client process owns TOKENS_PER_CALL jobs on every shard (delivered to it through the consumer
group, as a worker's are) and calls the publish_tokens_many script (worker/lua.py: ownership check, the
stream's last event, XADD, EXPIRE) with one token delta for each of them, shard after shard, as fast as
Redis answers. Reports result events/s and each master's CPU seconds; on a small box the client
processes and the masters share the cores, which is where it saturates."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from api_client.keys import JOB_FIELD, Keys
from api_client.schema import TokenEvent, dump_event
from bench.cluster_queue import RESULTS, cpu_s
from tests.helpers.redis_cluster import LocalCluster
from worker import lua
from worker.publisher import TOKENS_PER_CALL

PREFIX = "bench"


def client_loop(url: str, keys: Keys, name: str, seconds: float, out: Any) -> None:
    from redis.cluster import RedisCluster

    r = RedisCluster.from_url(url)
    scripts = lua.Scripts(r, keys, name)
    owned: dict[int, list[tuple[str, str]]] = {}
    for shard in keys.shards:
        ids = [f"{name}-{shard.index}-{k}" for k in range(TOKENS_PER_CALL)]
        for job_id in ids:
            r.xadd(shard.jobs, {JOB_FIELD: json.dumps({"id": job_id, "prompt": "x"})})
        reply: Any = r.xreadgroup(keys.group, name, {shard.jobs: ">"}, count=TOKENS_PER_CALL)
        entries = [e[0].decode() for e in reply[0][1]]
        owned[shard.index] = list(zip(ids, entries, strict=True))
    index = 0
    num_written = 0
    event = dump_event(TokenEvent(index=0, token_ids=[1234], text=" word"))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for shard in keys.shards:
            deltas = [(job_id, entry_id, index, 1, event.replace('"index":0', f'"index":{index}'), 600)
                      for job_id, entry_id in owned[shard.index]]
            k, a = scripts.tokens_many_args(shard, deltas)
            reply = scripts.publish_tokens_many(keys=k, args=a)
            num_written += sum(1 for code in reply[0::2] if int(code) == lua.WRITTEN)
        index += 1
    out.put(num_written)


def run(num_masters: int, num_shards: int, num_clients: int, seconds: float) -> dict[str, Any]:
    keys = Keys(PREFIX, num_shards=num_shards, cluster=True)
    with LocalCluster(num_masters=num_masters, replicas=0) as cluster:
        setup = cluster.client()
        for shard in keys.shards:
            setup.xgroup_create(shard.jobs, keys.group, id="0", mkstream=True)
        shard_to_master = {s.index: cluster.master_of(s.jobs).port for s in keys.shards}
        setup.close()
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        cpu0 = {n.port: cpu_s(n.process.pid) for n in cluster.nodes if n.process}
        procs = [ctx.Process(target=client_loop, args=(cluster.url, keys, f"c{i}", seconds, out))
                 for i in range(num_clients)]
        started = time.monotonic()
        for p in procs:
            p.start()
        written = sum(out.get(timeout=seconds + 120) for _ in procs)
        elapsed = time.monotonic() - started
        for p in procs:
            p.join()
        redis_cpu = {n.port: round(cpu_s(n.process.pid) - cpu0[n.port], 1) for n in cluster.nodes if n.process}
    # The clients' own setup (XADD, XREADGROUP) runs before the timed loop: count the loop's seconds.
    return {"masters": num_masters, "shards": num_shards, "clients": num_clients, "seconds": seconds,
            "events": written, "events_per_s": round(written / seconds), "wall_s": round(elapsed, 1),
            "redis_cpu_s": redis_cpu, "shard_to_master": shard_to_master}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masters", default="1,2,4")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--tag", default=time.strftime("%Y-%m-%d"))
    args = p.parse_args(argv)
    rows = []
    for masters in (int(m) for m in args.masters.split(",")):
        row = run(masters, args.shards, args.clients, args.seconds)
        rows.append(row)
        print(f"{masters} masters x {args.shards} shards, {args.clients} clients: {row['events_per_s']} events/s "
              f"(redis cpu {row['redis_cpu_s']} s in {args.seconds} s; shards->masters {row['shard_to_master']})",
              flush=True)
    report = {"command": " ".join(["python -m bench.cluster_publish", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out_path = Path(RESULTS) / f"cluster-publish-{args.tag}.json"
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
