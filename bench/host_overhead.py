"""Host (Python) time of one engine step at batch 256, on the CPU, with the model runner faked out.

    python -m bench.host_overhead [--stream-text] [--num-steps 200] [--repeats 3] [--profile]

The fake launch returns a fixed token for every request the real runner would sample, so what
is timed is the engine's own bookkeeping: schedule, update_from_output, the output processing (text,
stop strings) and the rest of LLMEngine.step. The GPU path runs exactly this code while the GPU idles between decode graphs."""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workload import make_workload
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

FAKE_TOKEN_ID = 42
NUM_REQUESTS = 256
PIECES = ("schedule", "fake runner", "update", "deltas", "rest")


def install_fake_runner(engine: LLMEngine) -> None:
    """Replace the model call: a request samples when this step computes up to its last known token."""
    requests = engine.scheduler.requests

    def launch(scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        output = ModelRunnerOutput()
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            request = requests[req_id]
            if request.num_computed_tokens + num_scheduled == request.num_tokens:
                output.sampled_token_ids[req_id] = FAKE_TOKEN_ID
        return output

    # The engine runs one step at a time here (async_scheduling=False): launch returns the output, and
    # wait hands it back.
    engine.model_runner.launch = launch  # type: ignore[method-assign,assignment]
    engine.model_runner.wait = lambda output: output  # type: ignore[method-assign,assignment,return-value]


def build_engine(model_dir: Path, *, stream_text: bool, num_steps: int, repeats: int) -> LLMEngine:
    workload = make_workload(NUM_REQUESTS, max_token_id=255)  # ids the tiny byte-level vocab knows
    max_model_len = 1024 + 2 * repeats * num_steps + 64
    num_blocks = sum(-(-(len(p) + 2 * repeats * num_steps + 64) // 16) for p in workload.prompts) + 16
    engine = LLMEngine(EngineConfig(model=str(model_dir), max_num_seqs=NUM_REQUESTS,
                                    max_num_batched_tokens=16384, max_model_len=max_model_len,
                                    num_kv_blocks=num_blocks, async_scheduling=False))
    install_fake_runner(engine)
    params = SamplingParams(max_tokens=max_model_len, ignore_eos=True, temperature=0.0)
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params, stream=stream_text)
    scheduler = engine.scheduler
    while scheduler.num_waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in scheduler.running):
        engine.step()
    assert scheduler.num_running == NUM_REQUESTS
    for _ in range(5):  # warm-up decodes
        engine.step()
    return engine


def time_steps(engine: LLMEngine, num_steps: int) -> float:
    """Mean ms per step over num_steps decode steps, nothing instrumented."""
    t0 = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    return (time.perf_counter() - t0) / num_steps * 1e3


def time_breakdown(engine: LLMEngine, num_steps: int) -> dict[str, float]:
    """ms per step of each piece, from timers wrapped around schedule, update and the output processing."""
    spent = dict.fromkeys(PIECES[:-1], 0.0)

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    scheduler, runner = engine.scheduler, engine.model_runner
    fake_launch = runner.launch
    runner.launch = timed("fake runner", fake_launch)  # type: ignore[method-assign]
    scheduler.schedule = timed("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update_from_output = timed("update", scheduler.update_from_output)  # type: ignore[method-assign]
    processor = engine.output_processor
    processor.process = timed("deltas", processor.process)  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        total = time.perf_counter() - t0
    finally:
        del scheduler.schedule, scheduler.update_from_output, processor.process
        runner.launch = fake_launch  # type: ignore[method-assign]
    result = {name: s / num_steps * 1e3 for name, s in spent.items()}
    result["rest"] = total / num_steps * 1e3 - sum(result.values())
    return result


def run(model_dir: Path, *, stream_text: bool, num_steps: int, repeats: int, profile: bool) -> dict[str, float]:
    engine = build_engine(model_dir, stream_text=stream_text, num_steps=num_steps, repeats=repeats)
    totals = [time_steps(engine, num_steps) for _ in range(repeats)]
    breakdowns = [time_breakdown(engine, num_steps) for _ in range(repeats)]
    result = {"total": statistics.median(totals)}
    for piece in PIECES:
        result[piece] = statistics.median(b[piece] for b in breakdowns)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        time_steps(engine, 50)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stream-text", action="store_true", help="also time deltas with text (the worker)")
    parser.add_argument("--num-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile 50 more steps (stderr, by tottime)")
    args = parser.parse_args()
    from tests.helpers.tiny_models import make_tiny_model

    modes = [False, True] if args.stream_text else [False]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model("llama", Path(tmp) / "tiny", max_position_embeddings=4096)
        rows = [(mode, run(model_dir, stream_text=mode, num_steps=args.num_steps, repeats=args.repeats,
                           profile=args.profile)) for mode in modes]
    print(f"host ms per decode step at batch {NUM_REQUESTS} (fake runner, median of {args.repeats} x "
          f"{args.num_steps} steps; pieces from a timed pass)")
    print(f"| deltas | {' | '.join(('total', *PIECES))} |")
    print("| --- " * (len(PIECES) + 2) + "|")
    for mode, r in rows:
        label = "text per step (worker)" if mode else "ids only (generate)"
        print(f"| {label} | " + " | ".join(f"{r[k]:.2f}" for k in ("total", *PIECES)) + " |")


if __name__ == "__main__":
    main()
