"""A stand-in GPU for serving benchmarks on a CPU box: the model call becomes a sleep as long as an H100
step, and the sampled tokens a hash of (request, position).

    python -m bench.serving --fake-gpu ...          (bench/serving.py runs its worker as below)
    TOKENRELAY_BENCH_FAKE_GPU=7,10 python -m bench.fake_gpu    (= `python -m worker`, faked)

What it keeps real: the scheduler, the block pool, every output, detokenization, the worker, Redis. What
it fakes: the forward pass and the sampler, whose cost is `base_ms + us_per_token * scheduled tokens`
of sleep (the GIL is released, as it is while a real step waits on the GPU). The default 7 ms + 10 us
per token approximates the H100 figures of BENCHMARKS.md (9.4 ms per decode step at batch 256; a
16,384-token prefill chunk ~170 ms). So it measures the host side of serving at the real batch size:
what the worker's Python costs the engine, which is the whole question of the queue overhead.

The patch is applied when this module is imported with TOKENRELAY_BENCH_FAKE_GPU set. That covers
the engine core process too: multiprocessing's spawn imports the parent's main module (this one)
in the child before it runs the core."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

ENV = "TOKENRELAY_BENCH_FAKE_GPU"
DEFAULT = "7,10"  # base ms per step, us per scheduled token


def parse(spec: str) -> tuple[float, float]:
    base_ms, _, per_token_us = spec.partition(",")
    return float(base_ms), float(per_token_us or 0.0)


def install(spec: str) -> None:
    """Replace ModelRunner.launch and .wait (class-wide) with the timed fake.

    The fake device is a queue: a launched step starts when the previous one ends (or at launch, if
    the device is idle) and wait() sleeps until it is done, so async scheduling overlaps the host's work
    with the "GPU" as it would on a real one."""
    from engine.model_runner import ModelRunner
    from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

    base_ms, per_token_us = parse(spec)

    def launch(self: Any, scheduler_output: SchedulerOutput) -> tuple[ModelRunnerOutput, float]:
        # The runner's own view of each request: tokens known = the prompt (and outputs, when new)
        # plus every token it sampled since, counted at launch; a request samples once a step
        # computes up to that.
        known: dict[str, int] = self.__dict__.setdefault("_fake_known", {})
        for req_id in scheduler_output.finished_req_ids:
            known.pop(req_id, None)
        computed = {new.req_id: new.num_computed_tokens for new in scheduler_output.new_requests}
        for new in scheduler_output.new_requests:
            known[new.req_id] = len(new.token_ids)
        for cached in scheduler_output.cached_requests:
            computed[cached.req_id] = cached.num_computed_tokens
        output = ModelRunnerOutput()
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            if computed[req_id] + num_scheduled == known[req_id]:
                # Varied ids (real text to decode), never the reserved 0/1 (bos/eos).
                token_id = 2 + (hash(req_id) + known[req_id] * 2654435761) % (self.vocab_size - 2)
                output.sampled_token_ids[req_id] = token_id
                known[req_id] += 1
        if scheduler_output.is_empty:
            return output, 0.0
        duration = (base_ms + per_token_us / 1e3 * scheduler_output.total_num_scheduled_tokens) / 1e3
        done_at = max(time.monotonic(), self.__dict__.get("_fake_free_at", 0.0)) + duration
        self._fake_free_at = done_at
        return output, done_at

    def wait(self: Any, handle: tuple[ModelRunnerOutput, float]) -> ModelRunnerOutput:
        output, done_at = handle
        delay = done_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return output

    ModelRunner.launch = launch  # type: ignore[method-assign,assignment]
    ModelRunner.wait = wait  # type: ignore[method-assign,assignment]


if os.environ.get(ENV):
    install(os.environ[ENV])

if __name__ == "__main__":
    from worker.__main__ import main

    sys.exit(main())
