"""LLMEngine end to end on the CPU: greedy output equals HF transformers token for token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, InvalidRequestError, PromptTooLongError, SamplingParams
from engine.llm_engine import LLMEngine
from tests.helpers.tiny_models import ARCHITECTURES


def _prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(n)] for n in lengths]


def _hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        outs.append(out[0, len(ids):].tolist())
    return outs


LENGTHS = [3, 17, 40, 9, 64, 1, 33, 16]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs[arch]
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256, max_num_seqs=8))
    prompts = _prompts(engine.vocab_size, LENGTHS, seed=1)
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    expected = _hf_greedy(model_dir, prompts, 12)
    assert [o.token_ids for o in outs] == expected


@pytest.mark.parametrize(
    "knobs",
    [
        # A pool too small for all eight at once: requests are preempted and recomputed.
        dict(num_kv_blocks=14, block_size=8, max_num_seqs=8),
        # A token budget smaller than most prompts: chunked prefill mixed with decodes.
        dict(num_kv_blocks=256, max_num_batched_tokens=8, max_num_seqs=4),
        dict(num_kv_blocks=256, scheduling_policy="priority", max_num_seqs=3),
    ],
    ids=["preemption", "chunked-prefill", "priority"],
)
def test_greedy_matches_hf_under_pressure(knobs: dict, tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["llama"]
    engine = LLMEngine(EngineConfig(model=str(model_dir), **knobs))
    prompts = _prompts(engine.vocab_size, LENGTHS, seed=2)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    expected = _hf_greedy(model_dir, prompts, 20)
    # HF stops at EOS; with ignore_eos we keep going, so compare the common prefix up to HF's length.
    for ours, ref in zip(outs, expected, strict=True):
        assert ours.token_ids[: len(ref)] == ref
    if "num_kv_blocks" in knobs and knobs["num_kv_blocks"] < 20:
        assert engine.stats().num_preemptions > 0, "the small pool should have forced preemption"


def test_prefix_cache_hits_keep_output_exact(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["qwen3"]
    engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=128, block_size=8))
    shared = _prompts(engine.vocab_size, [40], seed=3)[0]
    tails = _prompts(engine.vocab_size, [5, 11, 1], seed=4)
    prompts = [shared + t for t in tails] + [shared]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    first = engine.generate(prompts[:1], params)
    rest = engine.generate(prompts[1:], params)
    assert engine.stats().prefix_cache_hit_rate > 0.3
    assert [o.num_cached_tokens for o in rest] == [40, 40, 32]  # last: capped one block short
    expected = _hf_greedy(model_dir, prompts, 10)
    assert [o.token_ids for o in first + rest] == expected


def test_seeded_sampling_is_batch_independent(tiny_model_dirs: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["mistral"]), num_kv_blocks=256,
                                    max_num_seqs=16))
    prompts = _prompts(engine.vocab_size, [7] * 16, seed=5)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate([prompts[0]], seeded)[0]
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=i) for i in range(15)]
    batch = engine.generate(prompts, [seeded, *others])
    assert batch[0].token_ids == alone.token_ids
    assert len({tuple(o.token_ids) for o in batch}) > 8  # the other rows really sampled


def test_resumed_request_continues_exactly(tiny_model_dirs: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["qwen2"]), num_kv_blocks=128))
    prompt = _prompts(engine.vocab_size, [12], seed=6)[0]
    params = SamplingParams(max_tokens=14, temperature=1.0, seed=99, ignore_eos=True)
    whole = engine.generate([prompt], params)[0]
    engine.add_request("resumed", prompt_token_ids=prompt, params=params,
                       resume_token_ids=whole.token_ids[:5])
    tail: list[int] = []
    first_index = None
    while engine.has_unfinished():
        for out in engine.step():
            if first_index is None:
                first_index = out.index
            tail.extend(out.token_ids)
    assert first_index == 5
    assert whole.token_ids[:5] + tail == whole.token_ids


def test_stop_strings_and_text(tiny_model_dirs: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["llama"]), num_kv_blocks=128))
    prompt = "Hello world! Redis streams carry"
    base = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert base.text == engine.tokenizer.decode(base.token_ids, skip_special_tokens=True)
    visible = base.text
    if len(visible) < 6:
        pytest.skip("the random model produced too little visible text to cut")
    stop = visible[3:6]
    out = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop],
                                                   ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == visible[: visible.index(stop)]
    assert stop not in out.text


def test_a_request_resumed_after_its_stop_string_ends_at_once(tiny_model_dirs: dict[str, Path]) -> None:
    """A worker died between the token that completed a stop string and the final event: the job
    resumed elsewhere from those tokens is already done; generating on would change the completion."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["llama"]), num_kv_blocks=128))
    prompt = "Hello world! Redis streams carry"
    base = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    if len(base.text) < 6:
        pytest.skip("the random model produced too little visible text to cut")
    params = SamplingParams(max_tokens=24, temperature=0.0, stop=[base.text[3:6]], ignore_eos=True)
    stopped = engine.generate([prompt], params)[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 24
    engine.add_request("resumed", prompt, params=params, resume_token_ids=stopped.token_ids)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert [(o.finish_reason, o.token_ids, o.text) for o in outs] == [("stop", [], "")]
    assert outs[0].index == len(stopped.token_ids)
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0


def test_abort_frees_blocks_and_reports(tiny_model_dirs: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["llama"]), num_kv_blocks=64))
    free_before = engine.stats().num_free_blocks
    engine.add_request("a", prompt_token_ids=list(range(2, 40)), params=SamplingParams(max_tokens=50))
    engine.add_request("b", prompt_token_ids=list(range(3, 20)), params=SamplingParams(max_tokens=3))
    engine.step()
    engine.abort("a")
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.finish_reason
    assert finals["a"] == "abort"
    assert finals["b"] in ("length", "stop")
    assert engine.scheduler.num_running == 0
    # Blocks of finished requests go back to the free queue (cached, still reusable).
    assert engine.stats().num_free_blocks == free_before


def test_bad_input_is_rejected_and_engine_keeps_serving(tiny_model_dirs: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["qwen3"]), num_kv_blocks=64,
                                    max_model_len=64))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", prompt="")
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        engine.add_request("long", prompt_token_ids=list(range(2, 100)))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidRequestError):
        engine.add_request("two", prompt="hi", prompt_token_ids=[3, 4])
    out = engine.generate(["still serving"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out.token_ids) >= 1 and out.finish_reason in ("length", "stop")


def test_unknown_architecture_and_missing_weights(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    import json
    import shutil

    from engine.errors import UnsupportedModelError

    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dirs["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        LLMEngine(EngineConfig(model=str(bad), num_kv_blocks=16))
    empty = tmp_path / "noweights"
    shutil.copytree(tiny_model_dirs["llama"], empty)
    for f in empty.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        LLMEngine(EngineConfig(model=str(empty), num_kv_blocks=16))


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(model="x", max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="x", block_size=12)
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(model="x", scheduling_policy="lifo")  # type: ignore[arg-type]
