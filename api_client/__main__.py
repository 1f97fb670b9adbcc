"""`python -m api_client "question"`: submit one chat job and print its completion (or stream its tokens).

Exit status: 0 on done, 1 on an error event, 2 on bad arguments or a timeout."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from api_client.client import DEFAULT_REDIS_URL, Client, JobFailed
from api_client.keys import DEFAULT_PREFIX
from api_client.schema import DoneEvent, ErrorEvent, JobError, TokenEvent

DEFAULT_TEMPERATURE = 0.2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m api_client", description=__doc__)
    p.add_argument("prompt", nargs="?", help="a chat question, sent as the user's message (or give --messages-json)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt text as is, without the model's chat template")
    p.add_argument("--messages-json", help='chat messages, e.g. \'[{"role": "user", "content": "hi"}]\'')
    p.add_argument("--stream", action="store_true", help="print token text as it arrives")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"0 means greedy (default {DEFAULT_TEMPERATURE}: a small instruct model rambles when hotter)")
    p.add_argument("--redis-url", default=os.environ.get("TOKENRELAY_REDIS_URL", DEFAULT_REDIS_URL),
                   help="Redis URL (env TOKENRELAY_REDIS_URL)")
    p.add_argument("--prefix", default=os.environ.get("TOKENRELAY_PREFIX", DEFAULT_PREFIX),
                   help="key prefix (env TOKENRELAY_PREFIX)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the final event")
    p.add_argument("--job-id", help="job id (default: a fresh uuid4 hex)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    messages = None
    if args.messages_json is not None:
        try:
            messages = json.loads(args.messages_json)
        except json.JSONDecodeError as exc:
            print(f"error: --messages-json is not valid JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(messages, list):
            print("error: --messages-json must be a JSON list of {role, content} objects", file=sys.stderr)
            return 2
    if messages is None and args.prompt is not None and not args.raw:
        messages, args.prompt = [{"role": "user", "content": args.prompt}], None
    elif messages is not None and args.prompt is not None:
        print("error: give a prompt or --messages-json, not both", file=sys.stderr)
        return 2
    params = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature))
              if v is not None}
    with Client(args.redis_url, prefix=args.prefix) as client:
        try:
            job_id = client.submit(args.prompt, messages=messages, job_id=args.job_id, **params)
        except JobError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        try:
            if not args.stream:
                print(client.result(job_id, timeout=args.timeout).text)
                return 0
            for event in client.stream(job_id, timeout=args.timeout):
                if isinstance(event, TokenEvent):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, DoneEvent):
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                elif isinstance(event, ErrorEvent):
                    raise JobFailed(event.code, event.message, job_id)
        except JobFailed as exc:
            newline = "\n" if args.stream else ""  # end the partial line of streamed text
            print(f"{newline}error ({exc.code}): {exc.message}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
