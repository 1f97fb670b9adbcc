"""Two `python -m worker` processes serve 500 jobs while one of them is SIGKILLed three times at seeded
random moments and restarted: every job ends with exactly one final event, contiguous token indexes, and
the same greedy text as the offline engine.

Scale (CI: 2 CPU cores, the whole suite in ~8 minutes): 500 jobs of 10 tokens each, lease_s 2."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers.redis_server import RedisServer
from tests.reliability.conftest import (
    KEYS,
    Reference,
    WorkerProcess,
    check_against_reference,
    num_pending,
    push_jobs,
    read_results,
    wait_all_final,
    wait_until,
)

pytestmark = pytest.mark.reliability

NUM_JOBS = 500
MAX_TOKENS = 10
NUM_KILLS = 3
LEASE_S = 2.0
# Jobs pushed per second until the third kill (then the rest at once): 500 jobs would last 50 s, so jobs
# keep arriving over all three kills even where a worker takes 10 s to start.
RATE_PER_S = 10.0
SEED = 1234
PARAMS = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
WORKER_KNOBS: dict[str, Any] = dict(
    lease_s=LEASE_S, max_num_seqs=16, heartbeat_ttl_s=3,
    # A job in flight at several kills is delivered once per life of its worker: the default cap (3)
    # would send it to {p}:dead by design, which is not what this test is about.
    max_deliveries=10)


def produce(client: Any, jobs: list[dict[str, Any]], rate_per_s: float, hurry: threading.Event,
            entry_to_job: dict[str, str]) -> threading.Thread:
    """A producer pushing jobs at a steady rate in a thread, so both workers stay busy over the kills;
    once `hurry` is set (the kills are done) it pushes the rest at once."""

    def run() -> None:
        batch = max(1, int(rate_per_s / 10))
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            entry_to_job.update(zip(push_jobs(client, chunk), (job["id"] for job in chunk), strict=True))
            hurry.wait(batch / rate_per_s)

    thread = threading.Thread(target=run, name="producer", daemon=True)
    thread.start()
    return thread


def holds_job_mid_generation(client: Any, consumer: str, entry_to_job: dict[str, str]) -> bool:
    """Whether `consumer` holds a job that has tokens published and no final event yet."""
    pending = client.xpending_range(KEYS.jobs, KEYS.group, "-", "+", 100, consumername=consumer)
    job_ids = [entry_to_job[p["message_id"].decode()] for p in pending if p["message_id"].decode() in entry_to_job]
    return any(evs and not evs[-1].is_final for evs in read_results(client, job_ids).values())


def test_sigkill_three_times_loses_nothing_and_changes_nothing(
        model_dir: Any, reference_batch: Reference, workers: Callable[..., WorkerProcess]) -> None:
    rng = random.Random(SEED)
    prompts = {f"kill-{i}": f"job {i}: {rng.choice(['tokens', 'streams', 'blocks', 'workers'])} #{i * 7}"
               for i in range(NUM_JOBS)}
    expected = dict(zip(prompts, reference_batch(list(prompts.values()), PARAMS), strict=True))
    # Kill moments: a seeded delay after the (re)started victim is ready and holds jobs, so each kill
    # lands at an arbitrary point of a step, a publish or an ack.
    kill_delays_s = [rng.uniform(0.2, 2.5) for _ in range(NUM_KILLS)]
    # The victim comes back at once (it claims its own pending entries at startup), or after the lease
    # expired (w2 takes its jobs over with XAUTOCLAIM): both recovery paths run.
    restart_delays_s = [0.0, 3 * LEASE_S, rng.uniform(0.0, LEASE_S)]

    with RedisServer() as server:
        client: Any = server.client()
        # The victim runs its engine loop in a core process, the survivor in a thread: both frontends
        # go through the kills and must give the same tokens.
        victim = workers(server.url, "w1", engine_process=True, **WORKER_KNOBS)
        survivor = workers(server.url, "w2", **WORKER_KNOBS)
        jobs = [{"id": job_id, "prompt": p, "params": PARAMS} for job_id, p in prompts.items()]
        hurry = threading.Event()
        entry_to_job: dict[str, str] = {}
        producer = produce(client, jobs, RATE_PER_S, hurry, entry_to_job)

        in_flight_at_kill = []
        num_starts = 2
        for delay_s, restart_delay_s in zip(kill_delays_s, restart_delays_s, strict=True):
            for _ in range(5):  # a kill that lands after the victim's last job finished hit nothing: again
                wait_until(lambda: "worker ready" in victim.log_path.read_text(errors="replace"), timeout_s=120,
                           what="the victim ready")
                time.sleep(delay_s)
                # ...then the first moment it holds a job with some of its tokens out: the kill cuts it.
                wait_until(lambda: holds_job_mid_generation(client, "w1", entry_to_job), timeout_s=60,
                           what="the victim holding a job mid-generation")
                victim.kill()
                # What the dead worker held is exactly its PEL now (it can ack nothing more).
                in_flight = num_pending(client, "w1")
                if in_flight:
                    break
                victim.start()
                num_starts += 1
            in_flight_at_kill.append(in_flight)
            time.sleep(restart_delay_s)
            victim.start()
            num_starts += 1
        hurry.set()
        producer.join(120)

        results = wait_all_final(client, list(prompts), timeout_s=300,
                                 on_timeout=lambda: victim.logs() + survivor.logs())
        check_against_reference(results, expected, MAX_TOKENS)
        # Every kill hit jobs in flight (else the test proves nothing); they were finished by the
        # restarted victim (its own pending entries, at startup) or by w2 (after the lease).
        assert all(n > 0 for n in in_flight_at_kill), in_flight_at_kill
        wait_until(lambda: "worker ready" in victim.log_path.read_text(errors="replace"), timeout_s=120,
                   what="the last restart ready")
        assert survivor.is_alive and victim.is_alive
        wait_until(lambda: num_pending(client) == 0, timeout_s=60, what="every entry acked")
        assert client.xlen(KEYS.dead) == 0, client.xrange(KEYS.dead, count=3)
        logs = victim.logs() + survivor.logs()
        assert logs.count("worker ready") == num_starts
        assert "event=resume" in logs  # some job continued after tokens published before a kill
        assert "event=reclaimed" in survivor.logs()  # the takeover path ran too
        victim.stop()
        survivor.stop()
