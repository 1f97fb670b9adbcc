"""The Celery door against a real Redis (broker, result backend and streams) and a real worker: a producer
that never imports torch gets the same completions through Celery as through the stream path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.result import allow_join_result

from api_client import Client, TokenEvent
from api_client.celery import (
    DEFAULT_QUEUE,
    TASK_NAME,
    GenerationFailed,
    celery_config,
    completion_from_result,
    generate_signature,
    job_kwargs,
    send_generate,
)
from api_client.schema import JobError
from tests.helpers.queue_target import TARGETS
from tests.worker.conftest import PREFIX, REPO_ROOT, InProcessWorker, QueueTarget, settings_for, wait_until
from worker.celery_door import CeleryDoor, marker_key, start_celery_door

NUM_JOBS = 20
PARAMS: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0}

# The producer: a plain Celery app and our typed helper, nothing else (no torch, no worker code).
PRODUCER = textwrap.dedent("""
    import json, sys
    from celery import Celery
    from api_client.celery import GenerationFailed, celery_config, send_generate

    url, num_jobs = sys.argv[1], int(sys.argv[2])
    app = Celery("producer", config_source=celery_config(url), set_as_current=False)
    prompts = [f"job {i}: the quick brown fox" for i in range(num_jobs)]
    results = [send_generate(app, p, max_tokens=8, temperature=0.0) for p in prompts]
    out = {"jobs": [{"prompt": p, "task_id": r.id, "completion": r.get(timeout=120)}
                    for p, r in zip(prompts, results)]}
    # A job the worker refuses (longer than max_model_len): the task fails with the protocol's code.
    too_long = send_generate(app, prompt_token_ids=[5] * 300, max_tokens=2)
    try:
        too_long.get(timeout=120)
    except GenerationFailed as exc:
        out["too_long"] = [exc.code, exc.message, exc.job_id == too_long.id]
    # kwargs that skip the helper's validation: refused by the door itself.
    raw = app.send_task("tokenrelay.generate", kwargs={"prompt": "x", "params": {"max_tokens": "8"}},
                        queue="tokenrelay")
    try:
        raw.get(timeout=120)
    except GenerationFailed as exc:
        out["invalid"] = [exc.code, exc.message, raw.id]
    out["torch_imported"] = "torch" in sys.modules or "worker" in sys.modules
    print(json.dumps(out))
""")


@dataclass
class DoorSettings:
    redis_url: str
    prefix: str = PREFIX
    result_ttl_s: int = 600
    consumer: str = "w1"
    celery_queue: str | None = DEFAULT_QUEUE
    celery_broker_url: str | None = None
    celery_concurrency: int = NUM_JOBS
    redis_cluster: bool = False
    queue_shards: int = 1


def door_settings(target: QueueTarget, **overrides: Any) -> DoorSettings:
    """The door of `target`'s layout, with Celery's broker on a plain Redis (kombu has no cluster client)."""
    return DoorSettings(target.url, celery_broker_url=target.broker_url, **target.settings, **overrides)


@pytest.fixture
def doors() -> Iterator[list[CeleryDoor]]:
    started: list[CeleryDoor] = []
    yield started
    for door in started:
        door.stop()


@pytest.mark.parametrize("queue_target", TARGETS, indirect=True)
def test_celery_producer_without_torch_gets_the_stream_path_completions(
        queue_target: QueueTarget, model_dir: Path, start_worker: Callable[..., InProcessWorker],
        doors: list[CeleryDoor], tmp_path: Path) -> None:
    start_worker(settings_for(queue_target.url, model_dir, max_num_seqs=NUM_JOBS, **queue_target.settings))
    door = start_celery_door(door_settings(queue_target))
    assert door is not None
    doors.append(door)
    script = tmp_path / "producer.py"
    script.write_text(PRODUCER)
    proc = subprocess.run([sys.executable, str(script), queue_target.broker_url, str(NUM_JOBS)], cwd=tmp_path,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_imported"] is False
    assert len(out["jobs"]) == NUM_JOBS
    with Client(queue_target.url, **queue_target.client_kwargs) as client:
        for job in out["jobs"]:
            celery_done = completion_from_result(job["completion"])
            assert celery_done.usage.completion_tokens == len(celery_done.token_ids) > 0
            # The same prompt through the stream path gives the same completion (greedy).
            stream_done = client.result(client.submit(job["prompt"], **PARAMS), timeout=120)
            assert (celery_done.text, celery_done.token_ids) == (stream_done.text, stream_done.token_ids)
            # The Celery job's tokens streamed to {p}:result:{task_id}, like any other job's.
            deltas = [e for e in client.stream(job["task_id"], timeout=10) if isinstance(e, TokenEvent)]
            assert "".join(e.text for e in deltas) == celery_done.text
        code, message, same_id = out["too_long"]
        assert code == "too_long" and message and same_id
        code, message, task_id = out["invalid"]
        assert code == "invalid_request" and "max_tokens" in message
        # The door wrote the refusal as the job's one final event, so stream readers end too.
        assert [e.type for e in client.stream(task_id, timeout=10)] == ["error"]


@pytest.mark.parametrize("queue_target", TARGETS, indirect=True)
def test_a_task_handed_back_by_a_stopping_door_is_not_enqueued_twice(
        queue_target: QueueTarget, model_dir: Path, start_worker: Callable[..., InProcessWorker],
        doors: list[CeleryDoor]) -> None:
    r = queue_target.client()
    keys = queue_target.keys
    jobs = keys.for_job("celery-job-1").jobs
    producer = Celery("producer", config_source=celery_config(queue_target.broker_url), set_as_current=False)
    first = start_celery_door(door_settings(queue_target, celery_concurrency=2))
    assert first is not None
    result = send_generate(producer, "hello there", job_id="celery-job-1", **PARAMS)
    # No GPU worker yet: the door has enqueued the job and waits for its final event.
    wait_until(lambda: r.exists(jobs) and r.xlen(jobs) == 1, timeout_s=30, what="the door's XADD")
    assert r.exists(marker_key(keys, "celery-job-1")) == 1
    first.stop()  # the waiting task goes back to the broker
    second = start_celery_door(door_settings(queue_target, celery_concurrency=2))
    assert second is not None
    doors.append(second)
    start_worker(settings_for(queue_target.url, model_dir, **queue_target.settings))
    with allow_join_result():  # this test process also hosts the door's worker
        value = result.get(timeout=120)
    with Client(queue_target.url, **queue_target.client_kwargs) as client:
        assert completion_from_result(value) == client.result("celery-job-1", timeout=10)
    entries: Any = r.xrange(jobs)
    assert len(entries) == 1, "the redelivered task must rejoin the job, not enqueue it again"


def test_helpers_validate_before_sending_and_pin_json() -> None:
    app = Celery("producer", config_source=celery_config("redis://127.0.0.1:1/0"), set_as_current=False)
    assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]
    sig = generate_signature(app, messages=[{"role": "user", "content": "hi"}], priority=3, job_id="j-1",
                             max_tokens=4, stop="\n")
    assert sig.task == TASK_NAME
    assert sig.kwargs == {"messages": [{"role": "user", "content": "hi"}], "priority": 3,
                          "params": {"max_tokens": 4, "stop": ["\n"]}}
    assert sig.options == {"queue": DEFAULT_QUEUE, "serializer": "json", "task_id": "j-1"}
    with pytest.raises(JobError, match="exactly one of prompt"):
        job_kwargs("a", prompt_token_ids=[1, 2])
    assert job_kwargs("a", lane="batch") == {"prompt": "a", "priority": 0, "params": {}, "lane": "batch"}
    with pytest.raises(JobError, match="lane"):
        job_kwargs("a", lane="bulk")
    with pytest.raises(JobError, match="temperature"):
        send_generate(app, "a", temperature=-1.0)  # refused before any broker connection
    with pytest.raises(JobError, match="job_id"):
        send_generate(app, "a", job_id="has space")
    # GenerationFailed survives Celery's JSON exception round trip with its fields.
    exc = app.backend.exception_to_python(app.backend.prepare_exception(GenerationFailed("expired", "late", "j")))
    assert isinstance(exc, GenerationFailed) and (exc.code, exc.message, exc.job_id) == ("expired", "late", "j")


def test_importing_the_producer_helper_loads_no_torch() -> None:
    code = "import sys, api_client.celery, celery; print('torch' in sys.modules, 'worker' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
