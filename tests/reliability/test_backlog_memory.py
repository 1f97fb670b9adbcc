"""10,000 jobs queued before a `python -m worker` starts: it drains them all, never holds more than
max_num_seqs entries (intake is capacity-driven), and its resident memory stays bounded meanwhile.

Scale: 10,000 jobs of 1-2 tokens; RSS sampled from /proc/<pid>/status every 50 ms."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers.redis_server import RedisServer
from tests.reliability.conftest import (
    KEYS,
    WorkerProcess,
    num_acked,
    num_pending,
    push_jobs,
    read_results,
    vm_rss_kb,
    wait_until,
)

pytestmark = pytest.mark.reliability

NUM_JOBS = 10_000
MAX_NUM_SEQS = 32
WARM_JOBS = 1_000  # RSS up to this many acked jobs is the baseline: every code path has run by then
# Allowed growth over the baseline's peak for the other 9,000 jobs. Holding the whole backlog (10k parsed
# jobs, engine requests, result buffers) would exceed it; allocator noise and caches stay well below.
RSS_SLACK = 1.10
RSS_SLACK_KB = 16 * 1024
SAMPLE_S = 0.05


class Sampler(threading.Thread):
    """Samples the worker's VmRSS, its pending entries and the acked count until stopped."""

    def __init__(self, client: Any, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.client = client
        self.pid = pid
        self.samples: list[tuple[int, int, int]] = []  # (acked, rss_kb, pending entries of the worker)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            rss = vm_rss_kb(self.pid)
            if rss is None:
                return
            self.samples.append((num_acked(self.client), rss, num_pending(self.client, "w1")))


def test_ten_thousand_queued_jobs_drain_with_bounded_memory(
        workers: Callable[..., WorkerProcess]) -> None:
    jobs: list[dict[str, Any]] = [{"id": f"bl-{i}", "prompt": f"backlog job {i} of many",
             "params": {"max_tokens": 1 + i % 2, "temperature": 0, "ignore_eos": True}, "result_ttl_s": 600}
            for i in range(NUM_JOBS)]
    with RedisServer() as server:
        client: Any = server.client()
        client.xgroup_create(KEYS.jobs, KEYS.group, id="0", mkstream=True)
        push_jobs(client, jobs)  # the whole backlog is queued before the worker starts
        worker = workers(server.url, "w1", max_num_seqs=MAX_NUM_SEQS, num_kv_blocks=256,
                         args=["--log-level", "WARNING"])
        sampler = Sampler(client, worker.pid)
        sampler.start()
        try:
            wait_until(lambda: num_acked(client) >= NUM_JOBS, timeout_s=400, what="the backlog drained")
        finally:
            sampler.stopped.set()
            sampler.join(10)
        assert worker.is_alive

        results = read_results(client, [j["id"] for j in jobs])
        for job in jobs:
            evs = results[job["id"]]
            assert evs and evs[-1].type == "done", (job["id"], evs)
            assert len(evs[-1].token_ids) == job["params"]["max_tokens"]
        assert num_pending(client) == 0 and client.xlen(KEYS.dead) == 0

        samples = sampler.samples
        warm = [rss for acked, rss, _ in samples if acked <= WARM_JOBS]
        late = [rss for acked, rss, _ in samples if acked > WARM_JOBS]
        assert warm and len(late) >= 10, f"too few samples: {len(warm)} warm, {len(late)} late"
        bound_kb = max(warm) * RSS_SLACK + RSS_SLACK_KB
        assert max(late) <= bound_kb, (
            f"RSS grew to {max(late) / 1024:.0f} MiB while draining, over the bound {bound_kb / 1024:.0f} MiB "
            f"(warm-up peak {max(warm) / 1024:.0f} MiB): " + json.dumps(samples[::max(1, len(samples) // 20)]))
        # The mechanism behind the bound: the worker never took more entries than it had room for.
        assert max(p for _, _, p in samples) <= MAX_NUM_SEQS
