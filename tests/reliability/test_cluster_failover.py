"""A Redis Cluster master SIGKILLed under load (4 shards over 3 masters, two `python -m worker` processes):
its replica takes over after cluster-node-timeout, workers and clients reconnect through redis-py's
cluster client, and every job ends with exactly one final event, or its client learns it was lost
(JobLost): writes in Redis's asynchronous replication window may be gone. Nothing hangs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from api_client import Client, JobFailed, JobLost
from tests.helpers.queue_target import make_target
from tests.reliability.conftest import WorkerProcess, wait_until
from tests.worker.conftest import assert_contiguous, events, num_pending

pytestmark = pytest.mark.reliability

NUM_JOBS = 80
PARAMS = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
RESULT_TIMEOUT_S = 180.0  # per job, far beyond what a healthy run needs: a hang fails, not waits


def test_a_master_failover_under_load_ends_every_job_once(workers: Callable[..., WorkerProcess]) -> None:
    target = make_target("cluster-4")
    try:
        keys = target.keys
        pool = [workers(target.url, name, lease_s=3, heartbeat_ttl_s=3, socket_timeout_s=2, block_ms=100,
                        max_model_len=256, **target.settings) for name in ("w1", "w2")]
        for w in pool:
            wait_until(lambda w=w: "worker ready" in w.log_path.read_text(errors="replace"),  # type: ignore[misc]
                       timeout_s=120, what=f"{w.consumer} ready")
        client = Client(target.url, unknown_timeout_s=15, **target.client_kwargs)
        job_ids = [str(client.submit(f"failover {i}: keep going #{i * 7}", job_id=f"fo-{i}", **PARAMS))
                   for i in range(NUM_JOBS)]
        raw: Any = target.client()
        wait_until(lambda: sum(bool(events(raw, j, keys)) for j in job_ids) >= NUM_JOBS // 4, timeout_s=120,
                   what="a quarter of the jobs started")
        assert target.cluster is not None
        victim = keys.shards[0].jobs  # its master serves shard 0 (and maybe another shard)
        dead = target.cluster.kill_master(victim)
        killed_at = time.monotonic()
        new_master = target.cluster.wait_failover(dead)
        failover_s = time.monotonic() - killed_at

        outcomes: dict[str, str] = {}
        for job_id in job_ids:
            try:
                done = client.result(job_id, timeout=RESULT_TIMEOUT_S)
                outcomes[job_id] = f"done:{done.finish_reason}"
            except JobLost:
                outcomes[job_id] = "lost"
            except JobFailed as exc:
                outcomes[job_id] = f"error:{exc.code}"
        raw = target.client()  # a fresh view of the slot map
        for job_id, outcome in outcomes.items():
            if outcome == "lost":
                continue
            evs = events(raw, job_id, keys)
            assert sum(e.is_final for e in evs) == 1, (job_id, outcome, evs[-3:])
            tokens = assert_contiguous(evs)
            if outcome.startswith("done"):
                assert tokens == evs[-1].token_ids and len(tokens) == PARAMS["max_tokens"], job_id
        # Shards the dead master did not serve saw no failover at all: every one of their jobs is done.
        untouched = [j for j in job_ids if target.cluster.master_of(keys.for_job(j).jobs).port != new_master.port]
        assert untouched and all(outcomes[j] == "done:length" for j in untouched), outcomes
        # On loopback the replica is seldom behind: most jobs of the failed-over shards survive too.
        assert sum(o == "done:length" for o in outcomes.values()) >= NUM_JOBS * 3 // 4, outcomes
        wait_until(lambda: num_pending(raw, keys) == 0, timeout_s=60, what=f"every entry acked ({outcomes})")
        logs = "".join(w.logs() for w in pool)
        assert all(w.is_alive for w in pool), logs[-3000:]
        print(f"failover_s={failover_s:.1f} outcomes={sorted(set(outcomes.values()))}")
        for w in pool:
            assert w.stop() == 0, w.logs()[-3000:]
        client.close()
    finally:
        target.close()
