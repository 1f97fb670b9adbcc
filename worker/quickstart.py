"""`python -m worker.quickstart ["question"]`: the first run of a new user, end to end on this machine.

Starts `python -m worker` on the embedded default model (or TOKENRELAY_MODEL) against the local Redis
(started for the run if none answers), sends one chat question through the queue as any producer would,
prints the answer as it streams, and stops the worker. Exit code: 0 when the answer came back."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from api_client import Client, DoneEvent, ErrorEvent, TokenEvent
from worker.local_redis import RedisUnavailableError, ensure_local_redis
from worker.settings import ENV_PREFIX

DEFAULT_QUESTION = "What is the capital of France?"
READY_TIMEOUT_S = 300.0  # a cold start converts the GGUF's tokenizer once; later starts take seconds
STOP_TIMEOUT_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION, help="the chat question to ask")
    parser.add_argument("--max-tokens", type=int, default=128, help="most tokens in the answer")
    args = parser.parse_args(argv)
    try:
        local_redis = ensure_local_redis(os.environ.get(f"{ENV_PREFIX}REDIS_URL"))
    except RedisUnavailableError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    redis_url = local_redis.url if local_redis is not None else os.environ.get(
        f"{ENV_PREFIX}REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = os.environ.get(f"{ENV_PREFIX}PREFIX", "tokenrelay")
    env = {**os.environ, f"{ENV_PREFIX}REDIS_URL": redis_url, f"{ENV_PREFIX}METRICS_PORT": "0"}
    model = os.environ.get(f"{ENV_PREFIX}MODEL") or "the embedded SmolLM2-135M-Instruct"
    print(f"starting a worker on {model} (redis {redis_url}) ...", file=sys.stderr, flush=True)
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env)
    try:
        return _ask(worker, redis_url, prefix, args.question, args.max_tokens)
    finally:
        _stop(worker)
        if local_redis is not None:
            local_redis.stop()


def _ask(worker: subprocess.Popen[bytes], redis_url: str, prefix: str, question: str, max_tokens: int) -> int:
    with Client(redis_url, prefix=prefix) as client:
        # The job waits in the queue while the worker loads the model: the queue is the contract.
        job_id = client.submit(messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                               temperature=0.0)
        print(f"> {question}", flush=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        cursor = "0-0"
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                print(f"\nthe worker exited with code {worker.returncode} before answering", file=sys.stderr)
                return 1
            events, cursor = client.poll(job_id, cursor)
            for event in events:
                if isinstance(event, TokenEvent):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, DoneEvent):
                    print(f"\n[done: {event.finish_reason}, {event.usage.completion_tokens} tokens]", flush=True)
                    print("\nIt works. Keep a worker running with `.venv/bin/python -m worker` and ask with "
                          "`.venv/bin/python -m api_client --stream \"your question\"`.", file=sys.stderr)
                    return 0
                elif isinstance(event, ErrorEvent):
                    print(f"\nerror ({event.code}): {event.message}", file=sys.stderr)
                    return 1
            if not events:
                time.sleep(0.05)
        print(f"\nno answer within {READY_TIMEOUT_S:.0f}s", file=sys.stderr)
        return 1


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # a clean stop: drain, hand back, exit 0
        try:
            worker.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


if __name__ == "__main__":
    sys.exit(main())
