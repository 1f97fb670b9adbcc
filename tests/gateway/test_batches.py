"""The OpenAI Batch API through the official `openai` client, against real gateways, a real worker and a
real redis-server: a batch end to end (a malformed line and a bad one in the error file, the rest in
the output file), cancel mid-batch, a gateway killed mid-batch, and the same from Python and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from api_client import Client, Keys
from tests.gateway.conftest import API_KEY, API_KEYS, Gateway
from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import PREFIX, REPO_ROOT

FINAL = ("completed", "failed", "expired", "cancelled")


def _line(custom_id: str, content: str, max_tokens: int = 8, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "any", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "temperature": 0, **body}}


def _jsonl(lines: list[dict[str, Any] | str]) -> bytes:
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)


def _wait(client: Any, batch_id: str, timeout_s: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        time.sleep(0.2)  # polling, as an OpenAI client does


def _rows(client: Any, file_id: str | None) -> dict[str | None, dict[str, Any]]:
    if file_id is None:
        return {}
    rows = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    return {row["custom_id"]: row for row in rows}


def test_a_batch_runs_end_to_end_with_bad_lines_in_the_error_file(openai_client: Any, gateway_redis: RedisServer,
                                                                  served_model_name: str) -> None:
    questions = {f"q{i}": f"Name a colour, number {i}." for i in range(6)}
    lines: list[dict[str, Any] | str] = [_line(cid, q) for cid, q in questions.items()]
    lines.insert(2, '{"custom_id": "broken", "method": "POST", ')  # not JSON
    lines.append(_line("bad-param", "hi", temperature=9.0))  # fails validation
    uploaded = openai_client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(lines))
    assert openai_client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    batch = openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", metadata={"team": "a"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"team": "a"}
    # Every valid line is a job in the batch lane.
    raw: Any = gateway_redis.client()
    assert raw.xlen(Keys(PREFIX).lane_jobs("batch")) >= len(questions)
    assert any(b.id == batch.id for b in openai_client.batches.list(limit=100))
    done = _wait(openai_client, batch.id)
    assert done.status == "completed" and done.completed_at is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 6, 2)
    outputs = _rows(openai_client, done.output_file_id)
    assert sorted(outputs) == sorted(questions)  # one line per custom_id
    for cid, question in questions.items():
        response = outputs[cid]["response"]
        assert response["status_code"] == 200 and response["request_id"] and outputs[cid]["error"] is None
        body = response["body"]
        direct = openai_client.chat.completions.create(model=served_model_name, max_tokens=8, temperature=0,
                                                       messages=[{"role": "user", "content": question}])
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content  # greedy: equal
        assert body["usage"]["completion_tokens"] == direct.usage.completion_tokens
    errors = _rows(openai_client, done.error_file_id)
    assert sorted(errors, key=str) == sorted([None, "bad-param"], key=str)  # the broken line has no custom_id
    assert "line 3" in errors[None]["error"]["message"] and "temperature" in errors["bad-param"]["error"]["message"]


def test_cancel_mid_batch(openai_client: Any) -> None:
    lines: list[dict[str, Any] | str] = [
        _line(f"c{i}", f"Write a long story about the number {i}.", max_tokens=96, ignore_eos=True) for i in range(60)]
    uploaded = openai_client.files.create(file=("long.jsonl", _jsonl(lines)), purpose="batch")
    batch = openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
    cancelling = openai_client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = _wait(openai_client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    counts = done.request_counts
    assert counts.total == 60 and counts.completed + counts.failed == 60 and counts.failed > 0
    errors = _rows(openai_client, done.error_file_id)
    assert {row["error"]["code"] for row in errors.values()} == {"batch_cancelled"}
    assert set(errors) | set(_rows(openai_client, done.output_file_id)) == {f"c{i}" for i in range(60)}
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.cancel("batch_nope")


@pytest.mark.reliability  # a SIGKILLed gateway: the long fault-injection set (CI)
def test_a_gateway_killed_mid_batch_is_finished_by_another(start_gateway: Callable[..., Gateway],
                                                           gateway: Gateway) -> None:
    first = start_gateway(gateway_api_keys=API_KEYS, gateway_batch_lock_ttl_s=1, gateway_batch_poll_s=0.1)
    client = openai.OpenAI(base_url=f"{first.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    lines: list[dict[str, Any] | str] = [_line(f"r{i}", f"Count to {i}.", max_tokens=24) for i in range(24)]
    uploaded = client.files.create(file=("restart.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    first.kill()  # mid-batch: nothing of it can be left in that process
    second = start_gateway(gateway_api_keys=API_KEYS, gateway_batch_lock_ttl_s=1, gateway_batch_poll_s=0.1)
    client = openai.OpenAI(base_url=f"{second.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    done = _wait(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 24
    assert sorted(_rows(client, done.output_file_id)) == sorted(f"r{i}" for i in range(24))


def test_bad_requests_get_openai_errors(openai_client: Any) -> None:
    with pytest.raises(openai.BadRequestError, match="purpose"):
        openai_client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        openai_client.files.retrieve("file-missing")
    with pytest.raises(openai.NotFoundError):
        openai_client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                                     completion_window="24h")
    uploaded = openai_client.files.create(file=("x.jsonl", _jsonl([_line("a", "hi")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    page = openai_client.batches.list(limit=1)
    assert len(page.data) <= 1


def test_submit_batch_from_python_and_the_cli(gateway_redis: RedisServer, gateway: Gateway, tmp_path: Path) -> None:
    with Client(gateway_redis.url, prefix=PREFIX) as client:
        batch = client.submit_batch([_line("py-1", "Say hi."), _line("py-2", "Say bye.")])
        done = client.wait_batch(batch["id"], timeout=300)
        assert done["status"] == "completed" and done["request_counts"]["completed"] == 2
        rows = [json.loads(x) for x in client.file_content(done["output_file_id"]).splitlines()]
        assert sorted(r["custom_id"] for r in rows) == ["py-1", "py-2"]
    path = tmp_path / "in.jsonl"
    path.write_bytes(_jsonl([_line("cli-1", "Say yes."), "not json"]))
    env = {**os.environ, "TOKENRELAY_REDIS_URL": gateway_redis.url, "TOKENRELAY_PREFIX": PREFIX,
           "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "api_client", "--batch", str(path), "--output", str(out),
                           "--timeout", "300"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stderr  # one line failed
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["cli-1"]
    assert "status=completed completed=1 failed=1" in proc.stderr and "line 2" in proc.stderr
