"""`python -m api_client "question"`: submit one chat job and print its completion (or stream its tokens), or
`--status JOB_ID`. The text goes to stdout, the finish reason and usage line to stderr; `--json` prints
events as JSON lines instead. `--batch FILE.jsonl` runs an OpenAI Batch API input file (its lines in the
batch lane) and writes the output file's lines to stdout (or --output), the error file's to --errors.

Exit status: 0 on done (or a known job's status), 1 on an error event, 2 on bad arguments or a timeout,
3 when Redis cannot be reached or refuses the connection, 4 when the job is unknown or was lost."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import redis

from api_client.client import DEFAULT_REDIS_URL, Client, JobFailed, JobLost
from api_client.keys import DEFAULT_PREFIX, LANES
from api_client.schema import DoneEvent, ErrorEvent, JobError, TokenEvent, dump_event

EXIT_DONE, EXIT_ERROR_EVENT, EXIT_USAGE, EXIT_REDIS, EXIT_LOST = 0, 1, 2, 3, 4
DEFAULT_TEMPERATURE = 0.2
ENDPOINT_NAMES = ("/v1/chat/completions", "/v1/completions")  # api_client.batches.ENDPOINTS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m api_client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="a chat question, sent as the user's message (or give --messages-json)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt text as is, without the model's chat template")
    p.add_argument("--messages-json", help='chat messages, e.g. \'[{"role": "user", "content": "hi"}]\'')
    p.add_argument("--stream", action="store_true", help="print token text as it arrives")
    p.add_argument("--json", action="store_true",
                   help="print JSON: the final event (with --stream: every event), one object per line")
    p.add_argument("--max-tokens", type=int, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"0 means greedy (default {DEFAULT_TEMPERATURE}: a small instruct model rambles when hotter)")
    p.add_argument("--seed", type=int, help="seed of the sampling (reproducible output)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeat for several)")
    p.add_argument("--priority", type=int, default=0,
                   help="lower runs first within its lane under the priority policy (default 0)")
    p.add_argument("--lane", choices=LANES, help="priority class: interactive (default) or batch")
    p.add_argument("--batch", metavar="FILE.jsonl", help="run an OpenAI Batch API input file and print its output")
    p.add_argument("--endpoint", default="/v1/chat/completions", choices=sorted(ENDPOINT_NAMES),
                   help="with --batch: the endpoint of every line (default /v1/chat/completions)")
    p.add_argument("--output", metavar="PATH", help="with --batch: write the output file here (default stdout)")
    p.add_argument("--errors", metavar="PATH", help="with --batch: write the error file here (default stderr)")
    p.add_argument("--redis-url", default=os.environ.get("TOKENRELAY_REDIS_URL", DEFAULT_REDIS_URL),
                   help="Redis URL (env TOKENRELAY_REDIS_URL)")
    p.add_argument("--prefix", default=os.environ.get("TOKENRELAY_PREFIX", DEFAULT_PREFIX),
                   help="key prefix (env TOKENRELAY_PREFIX)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the final event")
    p.add_argument("--job-id", help="job id (default: a fresh uuid4 hex); an id already used replays that job")
    p.add_argument("--status", metavar="JOB_ID", help="print where job JOB_ID is (unknown, queued, running, done, "
                                                      "error) and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    messages = None
    if args.messages_json is not None:
        try:
            messages = json.loads(args.messages_json)
        except json.JSONDecodeError as exc:
            print(f"error: --messages-json is not valid JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if not isinstance(messages, list):
            print("error: --messages-json must be a JSON list of {role, content} objects", file=sys.stderr)
            return EXIT_USAGE
    if messages is None and args.prompt is not None and not args.raw:
        messages, args.prompt = [{"role": "user", "content": args.prompt}], None
    elif messages is not None and args.prompt is not None:
        print("error: give a prompt or --messages-json, not both", file=sys.stderr)
        return EXIT_USAGE
    params: dict[str, Any] = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                                ("seed", args.seed), ("stop", args.stop)) if v is not None}
    try:
        with Client(args.redis_url, prefix=args.prefix) as client:
            if args.status is not None:
                return _print_status(client, args.status, as_json=args.json)
            if args.batch is not None:
                return _run_batch(client, args)
            return _generate(client, args, messages, params)
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
        print(f"error: cannot reach Redis at {_redact(args.redis_url)}: {_first_line(exc)} (set --redis-url "
              "or TOKENRELAY_REDIS_URL)", file=sys.stderr)
        return EXIT_REDIS
    except redis.ResponseError as exc:  # e.g. NOPERM for an ACL user without the needed commands
        print(f"error: Redis refused a command: {_first_line(exc)}", file=sys.stderr)
        return EXIT_REDIS


def _print_status(client: Client, job_id: str, *, as_json: bool) -> int:
    status = client.status(job_id)
    print(json.dumps(status.to_dict()) if as_json else str(status))
    return EXIT_LOST if status.state == "unknown" else EXIT_DONE


def _generate(client: Client, args: argparse.Namespace, messages: list[Any] | None, params: dict[str, Any]) -> int:
    try:
        job_id = client.submit(args.prompt, messages=messages, job_id=args.job_id, priority=args.priority,
                               lane=args.lane, **params)
    except JobError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    if job_id.replayed:
        print(f"job {job_id} was submitted before: showing that job (nothing new was queued)", file=sys.stderr)
    streamed_text = False
    try:
        for event in client.stream(job_id, timeout=args.timeout):
            if args.json and (args.stream or event.is_final):
                print(dump_event(event), flush=True)
            elif isinstance(event, TokenEvent) and args.stream:
                sys.stdout.write(event.text)
                sys.stdout.flush()
                streamed_text = True
            elif isinstance(event, DoneEvent):
                print("" if args.stream else event.text, flush=True)
            if isinstance(event, DoneEvent):
                print(f"finish_reason={event.finish_reason} prompt_tokens={event.usage.prompt_tokens} "
                      f"completion_tokens={event.usage.completion_tokens} job_id={job_id}", file=sys.stderr)
            elif isinstance(event, ErrorEvent):
                raise JobFailed(event.code, event.message, job_id)
    except JobLost as exc:
        print(f"{_newline(streamed_text)}error: {exc.message}", file=sys.stderr)
        return EXIT_LOST
    except JobFailed as exc:
        print(f"{_newline(streamed_text)}error ({exc.code}): {exc.message}", file=sys.stderr)
        return EXIT_ERROR_EVENT
    except TimeoutError as exc:
        print(f"{_newline(streamed_text)}error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_DONE


def _run_batch(client: Client, args: argparse.Namespace) -> int:
    from api_client.batches import BatchApiError

    try:
        batch = client.submit_batch(args.batch, endpoint=args.endpoint)
        print(f"batch {batch['id']}: {batch['request_counts']['total']} requests queued in the batch lane",
              file=sys.stderr)
        batch = client.wait_batch(batch["id"], timeout=args.timeout)
    except (BatchApiError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for file_key, path, stream in (("output_file_id", args.output, sys.stdout), ("error_file_id", args.errors,
                                                                               sys.stderr)):
        if batch.get(file_key) is None:
            continue
        content = client.file_content(batch[file_key])
        if path is not None:
            with open(path, "wb") as f:
                f.write(content)
        else:
            stream.write(content.decode())
            stream.flush()
    counts = batch["request_counts"]
    print(f"status={batch['status']} completed={counts['completed']} failed={counts['failed']} "
          f"batch_id={batch['id']}", file=sys.stderr)
    return EXIT_DONE if batch["status"] == "completed" and not counts["failed"] else EXIT_ERROR_EVENT


def _newline(streamed_text: bool) -> str:
    return "\n" if streamed_text else ""  # end the partial line of streamed text


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


if __name__ == "__main__":
    sys.exit(main())
