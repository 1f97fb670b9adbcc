"""Nothing in a job makes the worker open a file, import a module, compile code or start a process.

A `python -m worker` runs under a CPython audit hook (sys.addaudithook) that is armed after warm-up jobs
have run every code path once; then hostile jobs (paths, Python and Jinja payloads, unknown fields naming
models, tokenizers or processors) are served, and the hook must have recorded nothing."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.redis_server import RedisServer
from tests.worker.conftest import REPO_ROOT, submit, wait_final, worker_env

pytestmark = pytest.mark.reliability

# Run as `python -c`: install the hook, arm it on SIGUSR1, dump what it saw at exit, run the worker.
DRIVER = """
import json, os, signal, sys
WATCHED = ("open", "import", "exec", "compile", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
           "os.fork", "subprocess.Popen", "ctypes.dlopen", "shutil.copyfile", "os.remove", "os.rename")
seen = []
armed = [False]
def hook(event, args):
    if armed[0] and event.startswith(WATCHED):
        seen.append([event, repr(args)[:300]])
sys.addaudithook(hook)
ready_fd = int(os.environ["AUDIT_READY_FD"])
def arm(signum, frame):
    armed[0] = True
    open(os.devnull).close()  # the control: proves the hook is armed and records opens
    os.write(ready_fd, b"1")  # tell the test (a write to an fd opened before: no audited event)
signal.signal(signal.SIGUSR1, arm)
from worker.__main__ import main
code = main(sys.argv[1:])
armed[0] = False
with open(os.environ["AUDIT_OUT"], "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""

MARKER = "tokenrelay-pwned"


def hostile_jobs(marker: Path) -> dict[str, dict[str, Any]]:
    payload = f"__import__('os').system('touch {marker}')"
    jinja = f"{{{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}"
    return {
        "h-path": {"prompt": "/etc/passwd", "params": {"max_tokens": 4}},
        "h-python": {"prompt": payload, "params": {"max_tokens": 4, "stop": [payload]}},
        "h-jinja-content": {"messages": [{"role": "user", "content": jinja}], "params": {"max_tokens": 4}},
        "h-jinja-role": {"messages": [{"role": jinja, "content": "hi"}], "params": {"max_tokens": 4}},
        "h-model": {"prompt": "a", "model": "/tmp/evil-model"},
        "h-tokenizer": {"prompt": "a", "tokenizer": "/tmp/evil-tokenizer", "trust_remote_code": True},
        "h-template": {"prompt": "a", "chat_template": jinja},
        "h-processor": {"prompt": "a", "params": {"logits_processors": ["os:system"]}},
        "h-ids": {"prompt_token_ids": [2**31 - 1, 0, 1], "params": {"max_tokens": 2}},
    }


def test_hostile_jobs_open_no_file_import_nothing_and_run_nothing(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / MARKER
    audit_out = tmp_path / "audit.json"
    with RedisServer() as server:
        client: Any = server.client()
        env = worker_env(server.url, model_dir, consumer="w-audit")
        env["AUDIT_OUT"] = str(audit_out)
        ready_r, ready_w = os.pipe()
        env["AUDIT_READY_FD"] = str(ready_w)
        log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO_ROOT, env=env, stdout=log, stderr=log,
                                pass_fds=(ready_w,))
        os.close(ready_w)
        try:
            # Warm-up: every path a job can take (prompt, chat messages, token ids, sampling, stop strings,
            # logprobs, a rejected job), so lazy imports and first-use caches are done before arming.
            warm: dict[str, dict[str, Any]] = {
                "w-prompt": {"prompt": "hello", "params": {"max_tokens": 3, "temperature": 0.8, "seed": 1,
                                                           "top_p": 0.9, "top_k": 5, "stop": ["x"], "logprobs": 2}},
                "w-chat": {"messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 3}},
                "w-ids": {"prompt_token_ids": [5, 6, 7], "params": {"max_tokens": 3, "repetition_penalty": 1.2,
                                                                    "presence_penalty": 0.5}},
                "w-bad": {"prompt": 1}, "w-unknown": {"prompt": "a", "nope": 1},
                "w-long": {"prompt_token_ids": [5] * 300},
            }
            for job_id, job in warm.items():
                submit(client, job_id, **job)
            for job_id in warm:
                wait_final(client, job_id, timeout_s=120)
            proc.send_signal(signal.SIGUSR1)
            readable, _, _ = select.select([ready_r], [], [], 60)
            assert readable and os.read(ready_r, 1) == b"1", "the audit hook was never armed"
            hostile = hostile_jobs(marker)
            for job_id, job in hostile.items():
                submit(client, job_id, **job)
            outcomes = {job_id: wait_final(client, job_id, timeout_s=120)[-1] for job_id in hostile}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
            os.close(ready_r)
    seen = json.loads(audit_out.read_text())
    assert [event for event, _ in seen] == ["open"] and os.devnull in seen[0][1], seen  # the control only
    assert not marker.exists()
    # Text is text: the hostile strings were served as prompts, the extra fields rejected.
    for job_id in ("h-path", "h-python", "h-jinja-content", "h-jinja-role"):
        assert outcomes[job_id].type == "done", (job_id, outcomes[job_id])
    for job_id in ("h-model", "h-tokenizer", "h-template", "h-processor", "h-ids"):
        assert outcomes[job_id].type == "error" and outcomes[job_id].code == "invalid_request", outcomes[job_id]
