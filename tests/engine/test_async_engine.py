"""The engine frontends: AsyncEngine (the step loop in a thread) and MPEngine (in a child process),
streamed into asyncio; each test runs against both."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest

from engine import EngineConfig, PromptTooLongError, RequestOutput, SamplingParams
from engine.async_engine import AsyncEngine, EngineFrontend
from engine.llm_engine import LLMEngine
from engine.mp_engine import MPEngine
from engine.outputs import FinishReason


@pytest.fixture(scope="module", params=["thread", "process"])
def async_engine(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]):
    config = EngineConfig(model=str(tiny_model_dirs["qwen3"]), num_kv_blocks=128, max_num_seqs=8,
                          max_model_len=128)
    engine: EngineFrontend = AsyncEngine(config) if request.param == "thread" else MPEngine(config)
    engine.start()
    yield engine
    engine.shutdown()


def test_streams_equal_offline_generate(async_engine: EngineFrontend, tiny_model_dirs: dict[str, Path]) -> None:
    prompts = ["Hello world!", "Redis streams carry jobs", "A paged KV cache", "ça va? 🚀"]
    params = SamplingParams(max_tokens=10, temperature=0.0)

    async def collect(i: int, prompt: str) -> list[RequestOutput]:
        return [out async for out in async_engine.stream(f"s{i}", prompt=prompt, params=params)]

    async def main() -> list[list[RequestOutput]]:
        return await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLMEngine(EngineConfig(model=str(tiny_model_dirs["qwen3"]), num_kv_blocks=128,
                                     max_model_len=128)).generate(prompts, params)
    for deltas, whole in zip(streams, offline, strict=True):
        # Contiguous (the process frontend may merge several steps' tokens into one delta).
        assert [d.index for d in deltas] == [sum(len(e.token_ids) for e in deltas[:i]) for i in range(len(deltas))]
        assert [t for d in deltas for t in d.token_ids] == whole.token_ids
        assert "".join(d.text for d in deltas) == whole.text
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])


def test_abort_from_another_thread_ends_the_stream(async_engine: EngineFrontend) -> None:
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main() -> list[RequestOutput]:
        outs = []
        async for out in async_engine.stream("long", prompt="Hello", params=params):
            outs.append(out)
            if len(outs) == 3:
                threading.Thread(target=async_engine.abort, args=("long",)).start()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort"
    assert len(outs) < 100


def test_submit_validates_in_the_callers_thread(async_engine: EngineFrontend) -> None:
    with pytest.raises(PromptTooLongError):
        async_engine.submit("too-long", prompt_token_ids=list(range(2, 200)), on_output=lambda o: None)
    done = threading.Event()
    got: list[RequestOutput] = []

    def on_output(out: RequestOutput) -> None:
        got.append(out)
        if out.finished:
            done.set()

    async_engine.submit("ok", prompt="still fine", params=SamplingParams(max_tokens=3), on_output=on_output)
    assert done.wait(60)
    assert got[-1].finish_reason in ("length", "stop")
    assert async_engine.stats().num_running == 0
    assert async_engine.has_capacity() == 8


def collect_all(engine: EngineFrontend, jobs: dict[str, dict]) -> dict[str, list[RequestOutput]]:
    """Submit every job at once from this thread; wait for each one's final output."""
    outs: dict[str, list[RequestOutput]] = {job_id: [] for job_id in jobs}
    done = threading.Semaphore(0)

    def on_output_for(job_id: str):
        def on_output(out: RequestOutput) -> None:
            outs[job_id].append(out)
            if out.finished:
                done.release()
        return on_output

    for job_id, kwargs in jobs.items():
        engine.submit(job_id, on_output=on_output_for(job_id), **kwargs)
    for _ in jobs:
        assert done.acquire(timeout=120)
    return outs


def test_stop_strings_resumes_logprobs_and_duplicates(async_engine: EngineFrontend,
                                                      tiny_model_dirs: dict[str, Path]) -> None:
    """The paths where text is decoded by the core (stop strings) or starts mid-way (resumed tokens)."""
    offline = LLMEngine(EngineConfig(model=str(tiny_model_dirs["qwen3"]), num_kv_blocks=128, max_model_len=128))
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    whole = offline.generate(["Hello world!"], greedy)[0]
    # A stop string the greedy text contains, after its first character (random weights: skip U+FFFD).
    stop = next(whole.text[i:i + 2] for i in range(1, len(whole.text) - 1)
                if "\ufffd" not in whole.text[i:i + 2] and whole.text[i:i + 2].strip())
    with_stop = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    stopped = offline.generate(["Hello world!"], with_stop)[0]
    assert stopped.finish_reason == "stop", (whole.text, stop)
    with_logprobs = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)
    logprobbed = offline.generate(["Redis"], with_logprobs)[0]
    outs = collect_all(async_engine, {
        "stop": {"prompt": "Hello world!", "params": with_stop},
        "resumed": {"prompt": "Hello world!", "params": greedy, "resume_token_ids": whole.token_ids[:5]},
        "logprobs": {"prompt": "Redis", "params": with_logprobs},
    })
    assert [t for o in outs["stop"] for t in o.token_ids] == stopped.token_ids
    assert "".join(o.text for o in outs["stop"]) == stopped.text and stop not in stopped.text
    assert outs["stop"][-1].finish_reason == "stop"
    resumed = outs["resumed"]
    assert resumed[0].index == 5 and [t for o in resumed for t in o.token_ids] == whole.token_ids[5:]
    # The text streamed after a resume is the whole text minus what the first 5 tokens had produced.
    assert whole.text.endswith("".join(o.text for o in resumed)) and "".join(o.text for o in resumed)
    got_logprobs = [lp for o in outs["logprobs"] for lp in (o.logprobs or [])]
    assert logprobbed.logprobs is not None and len(got_logprobs) == 5
    for got, want in zip(got_logprobs, logprobbed.logprobs, strict=True):
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-4 for k in got)
    # A duplicate id while the first still runs: only the duplicate fails.
    first: list[RequestOutput] = []
    second: list[RequestOutput] = []
    first_done, second_done = threading.Event(), threading.Event()

    def collect_into(outs: list[RequestOutput], done: threading.Event):  # type: ignore[no-untyped-def]
        def on_output(out: RequestOutput) -> None:
            outs.append(out)
            if out.finished:
                done.set()
        return on_output

    long_params = SamplingParams(max_tokens=30, ignore_eos=True)
    async_engine.submit("dup", prompt="x", params=long_params, on_output=collect_into(first, first_done))
    async_engine.submit("dup", prompt="x", params=long_params, on_output=collect_into(second, second_done))
    assert second_done.wait(60) and first_done.wait(60)
    assert [o.finish_reason for o in second] == ["error"] and "already" in (second[0].error or "")
    assert first[-1].finish_reason == "length" and sum(len(o.token_ids) for o in first) == 30
    assert sum(o.finished for o in first) == 1


def test_a_killed_engine_core_fails_its_requests_and_says_so(tiny_model_dirs: dict[str, Path]) -> None:
    engine = MPEngine(EngineConfig(model=str(tiny_model_dirs["qwen3"]), num_kv_blocks=128, max_num_seqs=4,
                                   max_model_len=512))
    engine.start()
    try:
        got: list[RequestOutput] = []
        started, done = threading.Event(), threading.Event()

        def on_output(out: RequestOutput) -> None:
            got.append(out)
            started.set()
            if sum(o.finished for o in got) == 2:
                done.set()

        # Long enough (500 tokens each) that the kill lands while both run.
        for job_id in ("victim", "victim-2"):
            engine.submit(job_id, prompt="Hello", params=SamplingParams(max_tokens=500, ignore_eos=True),
                          on_output=on_output)
        assert started.wait(60)
        pid = engine.core_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert done.wait(30)
        assert engine.error is not None and "exit" in str(engine.error)
        finals = [o for o in got if o.finished]
        assert sorted(o.request_id for o in finals) == ["victim", "victim-2"]
        # A typed end: an error, and what went wrong (the core's exit), not an abort with a flag beside it.
        assert all(o.finish_reason == FinishReason.ERROR and "exit" in (o.error or "") for o in finals)
        assert not engine.is_running
        with pytest.raises(RuntimeError, match="died"):
            engine.submit("late", prompt="x", on_output=on_output)
    finally:
        engine.shutdown()


def test_a_bad_checkpoint_raises_where_the_engine_is_built(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        MPEngine(EngineConfig(model=str(tiny_model_dirs["qwen3"]), max_model_len=10**7))


def test_a_failure_while_decoding_outputs_fails_that_request_and_nothing_else(
        async_engine: EngineFrontend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Turning a step's token ids into text raises for one request: that request ends with an error
    output (never silence: a job whose final output is lost holds its worker slot forever), and the
    engine goes on serving."""
    from engine.detokenizer import IncrementalDetokenizer

    original = IncrementalDetokenizer.update
    broken: set[int] = set()

    def update(self: IncrementalDetokenizer, new_token_ids):  # type: ignore[no-untyped-def]
        if id(self) in broken or not broken:
            broken.add(id(self))
            raise RuntimeError("injected decode failure")
        return original(self, new_token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "update", update)
    victim = collect_all(async_engine, {"victim": {"prompt": "Hello", "params": SamplingParams(
        max_tokens=20, ignore_eos=True)}})["victim"]
    assert victim[-1].finish_reason == "error" and "injected" in (victim[-1].error or "")
    assert sum(o.finished for o in victim) == 1
    fine = collect_all(async_engine, {"fine": {"prompt": "Hello", "params": SamplingParams(
        max_tokens=5, ignore_eos=True)}})["fine"]
    assert fine[-1].finish_reason == "length" and sum(len(o.token_ids) for o in fine) == 5
    assert async_engine.is_running and async_engine.error is None
    assert async_engine.stats().num_running == 0


def test_the_core_process_starts_before_the_frontend_loads_its_tokenizer(
        monkeypatch: pytest.MonkeyPatch, tiny_model_dirs: dict[str, Path]) -> None:
    """Start-up overlaps: the core imports and loads the model while this process builds its inputs."""
    import multiprocessing

    import engine.mp_engine as mp_engine

    seen: list[list[str]] = []
    earlier = {p.pid for p in multiprocessing.active_children()}  # other tests' cores may still be ending

    class Recording(mp_engine.InputProcessor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            seen.append([p.name for p in multiprocessing.active_children() if p.pid not in earlier])
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mp_engine, "InputProcessor", Recording)
    engine = MPEngine(EngineConfig(model=str(tiny_model_dirs["qwen3"]), num_kv_blocks=64, max_num_seqs=2))
    try:
        assert seen == [["tokenrelay-engine-core"]]
    finally:
        engine.shutdown()
