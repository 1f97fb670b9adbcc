"""A worker whose engine runs tensor-parallel (2 gloo ranks on the CPU): it serves jobs like one rank does,
and when a rank dies mid-job the engine ends with an error and the worker hands its jobs back and exits."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import (
    KEYS,
    assert_contiguous,
    events,
    spawn_worker,
    submit,
    wait_final,
    wait_until,
)

pytestmark = pytest.mark.reliability  # a worker, its engine core and a rank process: ~30 s on two cores


def test_a_dying_rank_ends_the_engine_and_the_worker_hands_its_job_back(
        redis_server: RedisServer, model_dir: Path, tmp_path: Path,
        reference: Callable[[str, dict[str, Any]], tuple[list[int], str]]) -> None:
    client: Any = redis_server.client()
    log_path = tmp_path / "worker.log"
    worker = spawn_worker(redis_server.url, model_dir, log_path=log_path, engine_process=True,
                          tensor_parallel_size=2, max_model_len=512, lease_s=600)
    try:
        short = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
        submit(client, "short", prompt="two ranks", params=short)
        evs = wait_final(client, "short", timeout_s=120)
        assert evs[-1].type == "done" and assert_contiguous(evs) == reference("two ranks", short)[0]
        submit(client, "long", prompt="a rank dies", params={"max_tokens": 400, "ignore_eos": True})
        wait_until(lambda: len(events(client, "long")) >= 1, timeout_s=120, what="the long job's first tokens")
        rank = re.search(r"tensor-parallel rank 1 pid=(\d+)", log_path.read_text())
        assert rank is not None, log_path.read_text()[-3000:]
        os.kill(int(rank.group(1)), signal.SIGKILL)
        assert worker.wait(60) == 1, log_path.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    log = log_path.read_text()
    assert "tensor-parallel rank 1" in log and "died" in log, log[-3000:]
    assert "job=long event=handback written=True" in log, log[-3000:]
    assert not events(client, "long")[-1].is_final  # no error event: another worker resumes it
    assert client.xpending(KEYS.jobs, KEYS.group)["pending"] == 0  # re-queued, not waiting for a lease
