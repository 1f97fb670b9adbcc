"""The FastAPI SSE example end to end: a real redis-server, `python -m worker` on the embedded real model
(nothing configured), the example served by uvicorn, httpx reading the Server-Sent Events as a browser's
EventSource would, and a real headless Chromium driven by selenium: a user types a question and watches
the answer stream in."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.redis_server import RedisServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "sse"
START_TIMEOUT_S = 120.0


@dataclass
class SseEvent:
    event: str
    data: dict[str, Any]
    id: str | None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(redis_url: str, **settings: Any) -> dict[str, str]:
    # The session's model cache (tests/conftest.py) is the one TOKENRELAY_* variable kept.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_") or k == "TOKENRELAY_CACHE_DIR"}
    env.update({"TOKENRELAY_REDIS_URL": redis_url, "TOKENRELAY_PREFIX": PREFIX, "PYTHONPATH": str(REPO_ROOT)})
    env.update({f"TOKENRELAY_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis-server + `python -m worker` (the embedded SmolLM2 on the CPU: no model set) + the example app;
    yields its base URL."""
    tmp = tmp_path_factory.mktemp("sse")
    port = _free_port()
    with RedisServer() as server:
        worker_log = open(tmp / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=REPO_ROOT, stdout=worker_log, stderr=worker_log,
            env=_env(server.url, consumer="sse-worker", num_kv_blocks=256, max_num_seqs=8,
                     max_model_len=1024, metrics_port=0, block_ms=100))
        web_log = open(tmp / "web.log", "wb")  # noqa: SIM115
        web = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.fastapi_sse.app:app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            cwd=REPO_ROOT, stdout=web_log, stderr=web_log, env=_env(server.url))
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert web.poll() is None, (tmp / "web.log").read_text()
                assert worker.poll() is None, (tmp / "worker.log").read_text()[-3000:]
                try:
                    if httpx.get(base + "/", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the example app did not come up"
                time.sleep(0.1)
            yield base
        finally:
            _stop(web)
            _stop(worker)
            worker_log.close()
            web_log.close()


def read_sse(client: Any, url: str, headers: dict[str, str] | None = None) -> list[SseEvent]:
    """Parse an event stream the way EventSource does (frames end with a blank line)."""
    events: list[SseEvent] = []
    fields: dict[str, str] = {}
    with client.stream("GET", url, headers=headers or {}, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line == "":
                if fields:
                    events.append(SseEvent(fields.get("event", "message"), json.loads(fields["data"]),
                                           fields.get("id")))
                fields = {}
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return events


def _generate(client: Any, base: str, **body: Any) -> str:
    reply = client.post(base + "/generate", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    job_id = reply.json()["job_id"]
    assert reply.json()["stream_url"] == f"/stream/{job_id}"
    return str(job_id)


def test_tokens_stream_as_sse_and_add_up_to_the_done_text(stack: str) -> None:
    with httpx.Client() as client:
        job_id = _generate(client, stack, messages=[{"role": "user", "content": "Hello, tokenrelay!"}],
                           max_tokens=12, temperature=0.0)
        events = read_sse(client, f"{stack}/stream/{job_id}")
    kinds = [e.event for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and set(kinds[:-1]) == {"token"}
    tokens = events[:-1]
    done = events[-1].data
    assert [e.data["index"] for e in tokens] == [sum(len(t.data["token_ids"]) for t in tokens[:i])
                                                  for i in range(len(tokens))]
    assert "".join(e.data["text"] for e in tokens) == done["text"]
    assert [tid for e in tokens for tid in e.data["token_ids"]] == done["token_ids"]
    assert done["usage"]["completion_tokens"] == len(done["token_ids"]) == 12 or done["finish_reason"] == "stop"
    # Each token frame's id counts the tokens delivered so far (EventSource's Last-Event-ID).
    assert [int(e.id or -1) for e in tokens] == [e.data["index"] + len(e.data["token_ids"]) for e in tokens]


def test_a_reconnect_with_last_event_id_skips_what_the_browser_has(stack: str) -> None:
    with httpx.Client() as client:
        job_id = _generate(client, stack, messages=[{"role": "user", "content": "Tell me about the sea."}],
                           max_tokens=10, temperature=0.0)
        first = read_sse(client, f"{stack}/stream/{job_id}")
        seen = first[0].id
        assert seen is not None
        again = read_sse(client, f"{stack}/stream/{job_id}", headers={"Last-Event-ID": seen})
    assert again[-1].event == "done" and again[-1].data == first[-1].data
    assert [e.data for e in again[:-1]] == [e.data for e in first[1:-1]]


def test_bad_requests_are_refused_with_the_reason(stack: str) -> None:
    with httpx.Client() as client:
        reply = client.post(stack + "/generate", json={"max_tokens": 5}, timeout=10)  # no prompt
        assert reply.status_code == 422 and "exactly one of prompt" in reply.json()["detail"]
        assert client.get(stack + "/stream/not a valid id", timeout=10).status_code == 422


def test_index_page_posts_and_listens_with_event_source(stack: str) -> None:
    with httpx.Client() as client:
        page = client.get(stack + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('fetch("generate"', "new EventSource", 'addEventListener("token"', 'addEventListener("done"'):
        assert needle in page.text


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_the_page_streams_tokens_in_headless_chromium(stack: str, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    # ?prompt= makes the page submit itself; the virtual time budget lets the stream finish before the
    # DOM is dumped. The page records what it streamed before the done event replaced it.
    url = f"{stack}/?prompt=What%20is%20the%20capital%20of%20France%3F&max_tokens=24&temperature=0"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                           "--virtual-time-budget=30000", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body is not None, proc.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("state") == "done", proc.stdout[-2000:]
    assert attrs["streamed-matches"] == "true" and int(attrs["streamed-tokens"]) > 0
    with httpx.Client() as client:
        done = read_sse(client, f"{stack}/stream/{attrs['job-id']}")[-1]
    assert done.event == "done" and len(done.data["token_ids"]) == int(attrs["streamed-tokens"])
    assert "Paris" in done.data["text"], "sent as a chat turn, the instruct model answers the question"


def _browser_paths() -> tuple[str, str] | None:
    browser, driver = _chromium(), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if os.environ.get("CI"):  # scripts/setup.sh installs both: in CI their absence is a failure
        pytest.fail("chromium and chromedriver are not installed (scripts/setup.sh installs them)")
    pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)")


# Records every length the answer box passes through, so the test sees tokens arrive one after another
# (streaming), not only the final text.
_WATCH_OUTPUT = """
window.lengths = [];
new MutationObserver(() => window.lengths.push(document.getElementById("output").textContent.length))
  .observe(document.getElementById("output"), {childList: true, characterData: true, subtree: true});
"""


def test_a_user_types_a_question_and_watches_the_answer_stream(stack: str, tmp_path: Path) -> None:
    paths = _browser_paths()
    assert paths is not None
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=paths[1]), options=options)
    try:
        driver.get(stack + "/")
        question = driver.find_element(By.ID, "prompt")
        question.clear()
        question.send_keys("What is the capital of France?")
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        driver.execute_script(_WATCH_OUTPUT)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        body = driver.find_element(By.TAG_NAME, "body")
        state, matches = body.get_attribute("data-state"), body.get_attribute("data-streamed-matches")
        status = driver.find_element(By.ID, "status").text
        answer = driver.find_element(By.ID, "output").text
        lengths = driver.execute_script("return window.lengths")
    finally:
        driver.quit()
    assert state == "done", status
    assert "Paris" in answer and status.startswith("done (stop)")
    assert matches == "true", "the streamed deltas add up to the final text"
    partial = sorted({n for n in lengths if 0 < n < len(answer)})
    assert len(partial) >= 2, f"the answer appeared at once, not token by token: {lengths}"
