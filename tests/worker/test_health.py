"""Health and identity with real `python -m worker` processes: `--check` reads this worker's own heartbeat
and fails when its engine stops stepping; one live worker per consumer name, while a worker restarted
after a crash still resumes its own pending jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import (
    KEYS,
    REPO_ROOT,
    assert_contiguous,
    events,
    spawn_worker,
    submit,
    wait_final,
    wait_until,
    worker_env,
)

LONG = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}


def check(redis_url: str, **overrides: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", "--check"], cwd=REPO_ROOT, text=True,
                          capture_output=True, timeout=60, env=worker_env(redis_url, None, **overrides))


def heartbeat(client: Any, consumer: str) -> dict[str, Any] | None:
    value = client.get(KEYS.heartbeat(consumer))
    return None if value is None else dict(json.loads(value))


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def test_check_reads_this_workers_own_heartbeat_and_fails_when_its_engine_hangs(
        redis_server: RedisServer, model_dir: Path, tmp_path: Path) -> None:
    client: Any = redis_server.client()
    log_path = tmp_path / "w1.log"
    worker = spawn_worker(redis_server.url, model_dir, log_path=log_path, engine_process=True, max_model_len=512)
    core_pid = None
    try:
        wait_until(lambda: heartbeat(client, "w1") is not None and "worker ready" in log_path.read_text(),
                   timeout_s=120, what="worker ready")
        ok = check(redis_server.url, consumer="w1")
        assert ok.returncode == 0 and ok.stdout.startswith("w1: "), ok.stderr
        # Another container's check with w1 alive under the prefix: its own worker is not there.
        other = check(redis_server.url, consumer="some-dead-container")
        assert other.returncode == 1
        assert "some-dead-container" in other.stderr and "live consumers under this prefix: w1" in other.stderr
        # A hung engine (its core process stopped mid-generation): the heartbeat goes on, the check fails.
        submit(client, "long", prompt="a hung engine", params=LONG)
        wait_until(lambda: len(events(client, "long")) >= 2, timeout_s=120, what="tokens of the long job")
        match = re.search(r"engine core ready pid=(\d+)", log_path.read_text())
        assert match is not None
        core_pid = int(match.group(1))
        os.kill(core_pid, signal.SIGSTOP)
        wait_until(lambda: (heartbeat(client, "w1") or {}).get("stalled_s", 0) >= 2, timeout_s=60,
                   what="the heartbeat to report the stall")
        hung = check(redis_server.url, consumer="w1", health_stall_s=2)
        assert hung.returncode == 1 and "has not finished a step" in hung.stderr, hung.stdout + hung.stderr
        assert check(redis_server.url, consumer="w1", health_stall_s=3600).returncode == 0
        os.kill(core_pid, signal.SIGCONT)
        core_pid = None
        wait_until(lambda: check(redis_server.url, consumer="w1", health_stall_s=2).returncode == 0,
                   timeout_s=60, what="healthy again once the engine steps")
    finally:
        if core_pid is not None:
            os.kill(core_pid, signal.SIGCONT)
        assert stop(worker) == 0


def test_a_second_worker_under_a_live_workers_name_refuses_to_start(
        redis_server: RedisServer, model_dir: Path, tmp_path: Path) -> None:
    client: Any = redis_server.client()
    first = spawn_worker(redis_server.url, model_dir, log_path=tmp_path / "first.log")
    try:
        wait_until(lambda: "worker ready" in (tmp_path / "first.log").read_text(), timeout_s=120, what="first ready")
        incarnation = heartbeat(client, "w1")["incarnation"]  # type: ignore[index]
        second = subprocess.run([sys.executable, "-m", "worker"], cwd=REPO_ROOT, text=True, capture_output=True,
                                timeout=120, env=worker_env(redis_server.url, model_dir))
        assert second.returncode == 2, second.stderr[-2000:]
        assert "consumer name 'w1' is in use by a live worker" in second.stderr
        assert "TOKENRELAY_CONSUMER" in second.stderr
        assert "worker ready" not in second.stderr  # refused before it read anything
        # The first one serves on, under its own heartbeat.
        assert heartbeat(client, "w1")["incarnation"] == incarnation  # type: ignore[index]
        submit(client, "after", prompt="still here", params={"max_tokens": 4, "temperature": 0})
        assert wait_final(client, "after")[-1].type == "done"
    finally:
        assert stop(first) == 0


def test_a_worker_restarted_after_sigkill_waits_out_the_old_heartbeat_and_resumes_its_jobs(
        redis_server: RedisServer, model_dir: Path, tmp_path: Path) -> None:
    client: Any = redis_server.client()
    # A long lease: nobody else would take the job over within the test, only w1's next run.
    first = spawn_worker(redis_server.url, model_dir, log_path=tmp_path / "first.log", lease_s=600,
                         max_model_len=512)
    try:
        submit(client, "cut", prompt="cut short by a crash", params=LONG)
        wait_until(lambda: len(events(client, "cut")) >= 2, timeout_s=120, what="first tokens")
    finally:
        first.kill()
        first.wait(30)
    assert heartbeat(client, "w1") is not None  # a SIGKILL leaves its heartbeat behind until the TTL
    second = spawn_worker(redis_server.url, model_dir, log_path=tmp_path / "second.log", lease_s=600,
                          max_model_len=512)
    try:
        evs = wait_final(client, "cut", timeout_s=180)
        assert evs[-1].type == "done" and len(assert_contiguous(evs)) == LONG["max_tokens"]
        log = (tmp_path / "second.log").read_text()
        assert "heartbeat expired; this run takes the name" in log
        assert "claimed 1 pending entries of an earlier run" in log and "event=resume" in log
    finally:
        assert stop(second) == 0
