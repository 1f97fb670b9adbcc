"""Redis SIGKILLed and restarted (AOF on, appendfsync always) while two `python -m worker` processes
serve: no job is lost, none is served twice, both workers reconnect and also serve jobs sent afterwards.

Scale: 300 jobs queued before the crash and 50 after it, 10 tokens each."""

from __future__ import annotations

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
    num_acked,
    num_pending,
    push_jobs,
    wait_all_final,
    wait_until,
)

pytestmark = pytest.mark.reliability

NUM_BEFORE = 300
NUM_AFTER = 50
MAX_TOKENS = 10
DOWN_S = 1.5  # long enough for every worker loop to hit a refused connection
PARAMS = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def test_redis_crash_and_restart_loses_no_job(
        reference_batch: Reference, workers: Callable[..., WorkerProcess]) -> None:
    prompts = {f"rr-{i}": f"restart {i}: the queue survives #{i * 13}" for i in range(NUM_BEFORE + NUM_AFTER)}
    expected = dict(zip(prompts, reference_batch(list(prompts.values()), PARAMS), strict=True))
    jobs = [{"id": job_id, "prompt": p, "params": PARAMS} for job_id, p in prompts.items()]

    with RedisServer(appendonly=True) as server:
        client: Any = server.client()
        pool = [workers(server.url, name, lease_s=3, heartbeat_ttl_s=3, socket_timeout_s=2, block_ms=100)
                for name in ("w1", "w2")]
        for w in pool:
            wait_until(lambda w=w: "worker ready" in w.log_path.read_text(errors="replace"),  # type: ignore[misc]
                       timeout_s=120, what=f"{w.consumer} ready")
        push_jobs(client, jobs[:NUM_BEFORE])
        wait_until(lambda: num_acked(client) >= NUM_BEFORE // 4, timeout_s=120, what="a quarter acked")
        acked_before = num_acked(client)
        pending_before = num_pending(client)
        server.kill()  # SIGKILL: only what the AOF fsynced survives (appendfsync always: every write)
        time.sleep(DOWN_S)
        server.start()
        client = server.client()
        assert acked_before < NUM_BEFORE and pending_before > 0, (
            "no job in flight at the crash: the test proves nothing")
        push_jobs(client, jobs[NUM_BEFORE:])

        def logs() -> str:
            return "".join(w.logs() for w in pool)

        results = wait_all_final(client, list(prompts), timeout_s=240, on_timeout=logs)
        check_against_reference(results, expected, MAX_TOKENS)
        wait_until(lambda: num_pending(client) == 0, timeout_s=60, what="every entry acked")
        assert client.xlen(KEYS.dead) == 0
        assert all(w.is_alive for w in pool), logs()[-3000:]
        # Both saw the outage, stayed up and reconnected: the heartbeat is back on the restarted server.
        for w in pool:
            assert "Error 111" in w.logs() or "Connection closed" in w.logs(), f"{w.consumer} saw no outage"
            assert client.exists(KEYS.heartbeat(w.consumer)) == 1, w.consumer
        for w in pool:
            assert w.stop() == 0, w.logs()[-3000:]
