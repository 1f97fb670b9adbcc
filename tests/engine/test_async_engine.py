"""AsyncEngine: the step loop in its own thread, streamed into asyncio."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from engine import EngineConfig, PromptTooLongError, RequestOutput, SamplingParams
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def async_engine(tiny_model_dirs: dict[str, Path]):
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dirs["qwen3"]), num_kv_blocks=128,
                                      max_num_seqs=8, max_model_len=128))
    engine.start()
    yield engine
    engine.shutdown()


def test_streams_equal_offline_generate(async_engine: AsyncEngine, tiny_model_dirs: dict[str, Path]) -> None:
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
        assert [d.index for d in deltas] == list(range(len(deltas)))  # contiguous, one token each
        assert [t for d in deltas for t in d.token_ids] == whole.token_ids
        assert "".join(d.text for d in deltas) == whole.text
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])


def test_abort_from_another_thread_ends_the_stream(async_engine: AsyncEngine) -> None:
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


def test_submit_validates_in_the_callers_thread(async_engine: AsyncEngine) -> None:
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
