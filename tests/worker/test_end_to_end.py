"""End to end: 200 jobs from another process against a running `python -m worker`, and a worker behind a
slow Redis whose engine keeps stepping while the publisher lags (deltas coalesce)."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api_client import Client
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from tests.helpers.redis_server import RedisServer
from tests.helpers.slow_proxy import SlowProxy
from tests.worker.conftest import (
    KEYS,
    InProcessWorker,
    QueueTarget,
    assert_contiguous,
    events,
    num_pending,
    settings_for,
    spawn_worker,
    submit,
    wait_final,
    wait_until,
)

NUM_JOBS = 200


# Today's layout in both engine modes; a Redis Cluster with 1 and 4 shards (hash-tagged keys) with the
# production default, the engine in its own process.
LAYOUTS = [("redis", False), ("redis", True),
           pytest.param("cluster-1", True, marks=pytest.mark.reliability),
           pytest.param("cluster-4", True, marks=pytest.mark.reliability)]


@pytest.mark.parametrize(("queue_target", "engine_process"), LAYOUTS, indirect=["queue_target"])
def test_200_jobs_each_get_exactly_one_done_equal_to_llm_engine(
        queue_target: QueueTarget, model_dir: Path, tmp_path: Path, engine_process: bool) -> None:
    prompts = [f"request {i}: " + "the quick brown fox "[: 3 + i % 17] for i in range(NUM_JOBS)]
    max_tokens = [4 + i % 9 for i in range(NUM_JOBS)]
    log_path = tmp_path / "worker.log"
    keys = queue_target.keys
    worker = spawn_worker(queue_target.url, model_dir, log_path=log_path, engine_process=engine_process,
                          **queue_target.settings)
    try:
        client = Client(queue_target.url, **queue_target.client_kwargs)
        job_ids = [client.submit(p, job_id=f"job-{i}", max_tokens=m, temperature=0)
                   for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True))]
        engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128, max_num_seqs=16,
                                        max_num_batched_tokens=512, max_model_len=256))
        expected = engine.generate(prompts, [SamplingParams(max_tokens=m, temperature=0) for m in max_tokens])
        raw = client.redis
        for job_id, want in zip(job_ids, expected, strict=True):
            evs = wait_final(raw, job_id, timeout_s=120, keys=keys)
            tokens = assert_contiguous(evs)
            assert sum(e.type in ("done", "error") for e in evs) == 1
            done = evs[-1]
            assert done.type == "done", (job_id, done)
            assert tokens == want.token_ids and done.token_ids == want.token_ids, job_id
            assert done.text == want.text and done.finish_reason == want.finish_reason, job_id
            assert "".join(e.text for e in evs[:-1]) == done.text
        assert num_pending(raw, keys) == 0
        if keys.num_shards > 1:  # the producer spread the jobs over every shard
            assert all(raw.xinfo_groups(shard.jobs)[0]["entries-read"] > 0 for shard in keys.shards)
        client.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log_path.read_text()[-3000:]
    core = re.search(r"engine core ready pid=(\d+)", log_path.read_text())
    assert (core is not None) == engine_process
    if core is not None:  # the worker took its engine core process with it
        assert not Path(f"/proc/{core.group(1)}").exists()


def test_slow_redis_does_not_slow_the_engine_loop(
        redis_server: RedisServer, model_dir: Path, reference: Callable[[str, dict[str, Any]], tuple[list[int], str]],
        start_worker: Callable[..., InProcessWorker]) -> None:
    params = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}
    prompts = {"s0": "slow redis zero", "s1": "slow redis one"}
    with SlowProxy(redis_server.port, latency_s=0.1) as proxy:
        client: Any = redis_server.client()  # the test itself talks to Redis directly
        worker = start_worker(settings_for(proxy.url, model_dir, max_model_len=512))
        for job_id, prompt in prompts.items():
            client.xadd(KEYS.jobs, {"job": f'{{"id": "{job_id}", "prompt": "{prompt}", '
                                           f'"params": {{"max_tokens": 200, "temperature": 0, "ignore_eos": true}}}}'})
        # While the first delta is still on its way through the proxy, the engine is already far ahead.
        wait_until(lambda: len(events(client, "s0")) >= 1, timeout_s=120, what="the first token event")
        engine = worker.worker.engine
        wait_until(lambda: engine.stats().num_generated_tokens >= 2 * params["max_tokens"], timeout_s=120,
                   what="the engine to finish generating")
        published_when_engine_done = sum(len(e.token_ids) for j in prompts for e in events(client, j)
                                         if e.type == "token")
        assert published_when_engine_done < 2 * params["max_tokens"], "the engine waited for Redis"
        for job_id, prompt in prompts.items():
            evs = wait_final(client, job_id, timeout_s=120)
            assert assert_contiguous(evs) == reference(prompt, params)[0]
            num_token_events = sum(e.type == "token" for e in evs)
            assert num_token_events < params["max_tokens"] / 4, "deltas were not coalesced"
        assert worker.worker.publisher.num_batches * 4 < engine.stats().num_steps
        assert worker.stop() == 0  # while the proxy is still up


def test_a_killed_worker_takes_its_engine_core_with_it(redis_server: RedisServer, model_dir: Path,
                                                       tmp_path: Path) -> None:
    """SIGKILL runs no cleanup in the worker: the core notices its pipes close and exits by itself, so
    a crashed worker never leaves a process holding the GPU."""
    log_path = tmp_path / "worker.log"
    worker = spawn_worker(redis_server.url, model_dir, log_path=log_path, engine_process=True,
                          max_model_len=512)
    try:
        client: Any = redis_server.client()
        submit(client, "long", prompt="busy core", params={"max_tokens": 400, "ignore_eos": True})
        wait_until(lambda: len(events(client, "long")) >= 1, timeout_s=120, what="the first token event")
        core = re.search(r"engine core ready pid=(\d+)", log_path.read_text())
        assert core is not None
        worker.kill()
        worker.wait(30)
        wait_until(lambda: not _alive(int(core.group(1))), timeout_s=30, what="the engine core to exit")
    finally:
        if worker.poll() is None:
            worker.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent (init, after the kill) reaps it
