"""`python -m api_client`: submits a job, prints streamed deltas or the final text, fails on error events."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from api_client.__main__ import main
from api_client.keys import EVENT_FIELD, Keys
from api_client.schema import DoneEvent, ErrorEvent, TokenEvent, dump_event, parse_job
from tests.helpers.redis_server import RedisServer, read_stream

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fake_producer(server: RedisServer, keys: Keys, job_id: str,
                   events: list[TokenEvent | DoneEvent | ErrorEvent]) -> threading.Thread:
    """Test driver: waits for the CLI's job to land in the jobs stream, then writes the given events."""

    def run() -> None:
        r = server.client()
        deadline = time.monotonic() + 20
        while not r.xlen(keys.jobs) and time.monotonic() < deadline:
            time.sleep(0.01)
        for event in events:
            r.xadd(keys.result(job_id), {EVENT_FIELD: dump_event(event)})
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _deltas() -> list[TokenEvent | DoneEvent | ErrorEvent]:
    return [TokenEvent(index=0, token_ids=[1], text="Hel"), TokenEvent(index=1, token_ids=[2, 3], text="lo, "),
            TokenEvent(index=3, token_ids=[4], text="world"),
            DoneEvent(finish_reason="stop", text="Hello, world", token_ids=[1, 2, 3, 4],
                      usage={"prompt_tokens": 2, "completion_tokens": 4})]  # type: ignore[arg-type]


def test_stream_prints_deltas(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    keys = Keys("cli")
    producer = _fake_producer(redis_server, keys, "cli-1", _deltas())
    code = main(["Say hello", "--stream", "--max-tokens", "4", "--temperature", "0", "--redis-url",
                 redis_server.url, "--prefix", "cli", "--job-id", "cli-1", "--timeout", "20"])
    producer.join()
    assert code == 0
    assert capsys.readouterr().out == "Hello, world\n"
    job = parse_job(read_stream(redis_server.client(), keys.jobs)[0][1]["job"], 1 << 20)
    # A question on the command line is a chat turn: an instruct model answers it as one.
    assert (job.id, job.prompt) == ("cli-1", None)
    assert job.messages is not None and [(m.role, m.content) for m in job.messages] == [("user", "Say hello")]
    assert job.params.sampling_kwargs() == {"max_tokens": 4, "temperature": 0.0}


def test_raw_sends_the_prompt_as_is_with_the_default_temperature(
        redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    keys = Keys("cli")
    producer = _fake_producer(redis_server, keys, "cli-raw", _deltas())
    code = main(["Once upon a time", "--raw", "--redis-url", redis_server.url, "--prefix", "cli",
                 "--job-id", "cli-raw", "--timeout", "20"])
    producer.join()
    assert code == 0 and capsys.readouterr().out == "Hello, world\n"
    job = parse_job(read_stream(redis_server.client(), keys.jobs)[0][1]["job"], 1 << 20)
    assert (job.prompt, job.messages) == ("Once upon a time", None)
    assert job.params.sampling_kwargs() == {"temperature": 0.2}


def test_final_text_with_messages(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    keys = Keys()
    events = _deltas()
    events[-1] = DoneEvent(finish_reason="length", text="whole text", token_ids=[1],
                           usage={"prompt_tokens": 2, "completion_tokens": 1})  # type: ignore[arg-type]
    producer = _fake_producer(redis_server, keys, "cli-2", events)
    code = main(["--messages-json", '[{"role": "user", "content": "hi"}]', "--redis-url", redis_server.url,
                 "--job-id", "cli-2", "--timeout", "20"])
    producer.join()
    assert code == 0 and capsys.readouterr().out == "whole text\n"
    job = parse_job(read_stream(redis_server.client(), keys.jobs)[0][1]["job"], 1 << 20)
    assert job.messages is not None and job.messages[0].content == "hi"


def test_bad_arguments_exit_2(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["x", "--max-tokens", "0", "--redis-url", redis_server.url]) == 2
    assert "params.max_tokens" in capsys.readouterr().err
    assert main(["--redis-url", redis_server.url]) == 2  # no prompt at all
    assert "exactly one of prompt" in capsys.readouterr().err
    assert redis_server.client().xlen(Keys().jobs) == 0


def test_error_event_exits_nonzero_in_subprocess(redis_server: RedisServer) -> None:
    keys = Keys("sub")
    producer = _fake_producer(redis_server, keys, "cli-3",
                              [TokenEvent(index=0, token_ids=[1], text="par"),
                               ErrorEvent(code="internal", message="worker lost the GPU")])
    env = {**os.environ, "TOKENRELAY_REDIS_URL": redis_server.url, "TOKENRELAY_PREFIX": "sub"}
    proc = subprocess.run([sys.executable, "-m", "api_client", "go", "--stream", "--job-id", "cli-3",
                           "--timeout", "20"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60)
    producer.join()
    assert proc.returncode == 1
    assert proc.stdout == "par"
    assert "error (internal): worker lost the GPU" in proc.stderr


def test_unreachable_redis_is_one_line_and_exit_3(capfd: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    code = main(["hi", "--redis-url", f"redis://127.0.0.1:{port}/0"])
    err = capfd.readouterr().err
    assert code == 3
    assert err.count("\n") == 1 and err.startswith(f"error: cannot reach Redis at redis://127.0.0.1:{port}/0")


def test_sampling_flags_json_output_and_the_usage_line(redis_server: RedisServer,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    keys = Keys("cli")
    producer = _fake_producer(redis_server, keys, "cli-4", _deltas())
    code = main(["Say hello", "--seed", "7", "--stop", "\n\n", "--stop", "END", "--priority", "3", "--json",
                 "--redis-url", redis_server.url, "--prefix", "cli", "--job-id", "cli-4", "--timeout", "20"])
    producer.join()
    assert code == 0
    out, err = capsys.readouterr()
    final = json.loads(out)  # one line: the done event
    assert final["type"] == "done" and final["finish_reason"] == "stop" and final["text"] == "Hello, world"
    assert "finish_reason=stop prompt_tokens=2 completion_tokens=4 job_id=cli-4" in err
    job = parse_job(read_stream(redis_server.client(), keys.jobs)[0][1]["job"], 1 << 20)
    assert job.priority == 3 and job.params.seed == 7 and job.params.stop == ["\n\n", "END"]


def test_stream_json_prints_every_event(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    keys = Keys("cli")
    producer = _fake_producer(redis_server, keys, "cli-5", _deltas())
    code = main(["x", "--stream", "--json", "--redis-url", redis_server.url, "--prefix", "cli", "--job-id", "cli-5",
                 "--timeout", "20"])
    producer.join()
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [dump_event(e) for e in _deltas()]


def test_status_and_replay(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--redis-url", redis_server.url, "--prefix", "cli"]
    assert main(["--status", "nobody", *common]) == 4
    assert capsys.readouterr().out == "unknown\n"
    keys = Keys("cli")
    producer = _fake_producer(redis_server, keys, "cli-6", _deltas())
    assert main(["first", "--job-id", "cli-6", "--timeout", "20", *common]) == 0
    producer.join()
    capsys.readouterr()
    assert main(["--status", "cli-6", "--json", *common]) == 0
    assert '"state": "done"' in capsys.readouterr().out
    assert main(["second", "--job-id", "cli-6", "--timeout", "20", *common]) == 0  # replays, queues nothing
    out, err = capsys.readouterr()
    assert out == "Hello, world\n" and "submitted before" in err
    assert redis_server.client().xlen(keys.jobs) == 1
