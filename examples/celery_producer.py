"""A Celery producer: send `tokenrelay.generate` tasks, print tokens as they stream, then the results.

Needs only the client and Celery, no torch: `pip install ".[celery]"` in a checkout of this repository.
Run a worker with TOKENRELAY_CELERY_QUEUE=tokenrelay (or `celery -A worker.celery_door worker -Q tokenrelay
-P threads`), then:
    python examples/celery_producer.py "Tell me a joke" --redis-url redis://127.0.0.1:6379/0"""

from __future__ import annotations

import argparse
import sys

from celery import Celery

from api_client import Client, TokenEvent
from api_client.celery import GenerationFailed, celery_config, completion_from_result, send_generate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="a chat question (sent as the user's message), or --raw text")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="broker, results and streams")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.2, help="low suits a small instruct model")
    args = parser.parse_args()

    app = Celery("producer", config_source=celery_config(args.redis_url))
    if args.raw:
        result = send_generate(app, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature)
    else:
        result = send_generate(app, messages=[{"role": "user", "content": args.prompt}],
                               max_tokens=args.max_tokens, temperature=args.temperature)
    # The task id is the job id: its tokens stream to {p}:result:{task_id} while the task runs.
    with Client(args.redis_url) as client:
        for event in client.stream(result.id, timeout=300):
            if isinstance(event, TokenEvent):
                sys.stdout.write(event.text)
                sys.stdout.flush()
    print()
    try:
        completion = completion_from_result(result.get(timeout=300))
    except GenerationFailed as exc:
        print(f"failed ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    print(f"[{completion.finish_reason}] {completion.usage.completion_tokens} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
