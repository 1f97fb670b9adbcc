"""Redis memory per queued job and per result stream, measured with MEMORY USAGE on a real redis-server
(the inputs of docs/scaling.md's fleet model).

    python -m bench.redis_memory

A queued job: its {p}:jobs entry (a chat job of --prompt-chars characters) and its marker {p}:job:{id}.
A result stream: the events of one served job of --tokens tokens, published one token per event (a
fast Redis) and coalesced 8 per event (a busy one), plus the done event with the whole text."""

from __future__ import annotations

import argparse
import json

from api_client.keys import Keys
from api_client.schema import DoneEvent, TokenEvent, Usage, dump_event
from tests.helpers.redis_server import RedisServer

NUM_JOBS = 10_000


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-chars", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args(argv)
    keys = Keys("bench", num_shards=4, cluster=True)
    with RedisServer() as server:
        r = server.client()
        shard = keys.shards[0]
        job = {"id": "x" * 32, "messages": [{"role": "user", "content": "a" * args.prompt_chars}],
               "params": {"max_tokens": args.tokens, "temperature": 0.7}}
        pipe = r.pipeline(transaction=False)
        for i in range(NUM_JOBS):
            pipe.xadd(shard.jobs, {"job": json.dumps({**job, "id": f"{i:032x}"})})
            pipe.set(shard.job(f"{i:032x}"), f"1796130748892-{i}", ex=90_000)
        pipe.execute()
        per_entry = r.memory_usage(shard.jobs, samples=0) / NUM_JOBS
        per_marker = r.memory_usage(shard.job(f"{0:032x}"))
        print(f"queued job ({args.prompt_chars}-char prompt): {per_entry:.0f} B in the stream + "
              f"{per_marker} B marker")
        text = "word " * args.tokens
        for per_event in (1, 8):
            key = shard.result(f"r{per_event}")
            for index in range(0, args.tokens, per_event):
                r.xadd(key, {"event": dump_event(TokenEvent(index=index, token_ids=list(range(1000, 1000 + per_event)),
                                                            text="word " * per_event))})
            r.xadd(key, {"event": dump_event(DoneEvent(finish_reason="length", text=text,
                                                       token_ids=[1000] * args.tokens,
                                                       usage=Usage(prompt_tokens=250, completion_tokens=args.tokens)))})
            print(f"result stream, {args.tokens} tokens, {per_event} per event: {r.memory_usage(key, samples=0)} B")


if __name__ == "__main__":
    main()
