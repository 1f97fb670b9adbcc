"""ModelRunner driven by hand-built SchedulerOutputs: chunked prefill beside decodes gives HF generate's
greedy tokens, logprobs match HF, and a seeded request continues identically after preemption."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.config import EngineConfig
from engine.model_files import ModelFiles
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput

BLOCK_SIZE = 8
NUM_BLOCKS = 32
PROMPT_A = [5, 17, 42, 99, 123, 7, 250, 64, 3, 300, 18, 77, 140]  # 13 tokens: prefilled in chunks
PROMPT_B = [9, 8, 7, 6, 5]


class _Driver:
    """Builds SchedulerOutputs by hand from a per-step plan {req_id: num_tokens}, with block ids drawn
    from a shuffled pool so block tables are non-contiguous."""

    def __init__(self, runner: ModelRunner, seed: int = 0) -> None:
        self.runner = runner
        self.free_blocks = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free_blocks)
        self.reqs: dict[str, dict[str, Any]] = {}

    def add(self, req_id: str, token_ids: list[int], params: SamplingParams, seed: int = 0,
            num_prompt_tokens: int | None = None) -> None:
        self.reqs[req_id] = dict(token_ids=list(token_ids), params=params, seed=seed, num_computed=0, blocks=[],
                                 num_prompt=len(token_ids) if num_prompt_tokens is None else num_prompt_tokens,
                                 is_new=True)

    def step(self, plan: dict[str, int], finished: set[str] | None = None) -> ModelRunnerOutput:
        so = SchedulerOutput(num_scheduled_tokens=dict(plan), total_num_scheduled_tokens=sum(plan.values()),
                             finished_req_ids=set(finished or ()))
        for req_id in so.finished_req_ids:
            self.free_blocks.extend(self.reqs.pop(req_id)["blocks"])
        for req_id, num in plan.items():
            req = self.reqs[req_id]
            num_needed = -(-(req["num_computed"] + num) // BLOCK_SIZE) - len(req["blocks"])
            new_blocks = [self.free_blocks.pop() for _ in range(num_needed)]
            req["blocks"].extend(new_blocks)
            if req["is_new"]:
                so.new_requests.append(NewRequestData(
                    req_id, list(req["token_ids"]), req["num_prompt"], list(req["blocks"]), req["num_computed"],
                    req["params"], req["seed"]))
                req["is_new"] = False
            else:
                so.cached_requests.append(CachedRequestData(req_id, new_blocks, req["num_computed"]))
        output = self.runner.execute_model(so)
        for req_id, num in plan.items():
            self.reqs[req_id]["num_computed"] += num
        for req_id, token_id in output.sampled_token_ids.items():
            self.reqs[req_id]["token_ids"].append(token_id)
        return output


def _runner(model_dir: Path, **overrides: Any) -> ModelRunner:
    config = EngineConfig(model=str(model_dir), device="cpu", block_size=BLOCK_SIZE,
                          num_kv_blocks=NUM_BLOCKS, **overrides)
    runner = ModelRunner(config, ModelFiles(str(model_dir), model_dir), AutoConfig.from_pretrained(model_dir), max_model_len=256)
    runner.allocate_kv_cache(runner.num_kv_blocks_from_memory())
    return runner


def _hf_greedy(model_dir: Path, prompt: list[int], num_tokens: int) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()  # may stop early at EOS; the runner does not know EOS


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_beside_decode_matches_hf_generate(tiny_model_dirs: dict[str, Path], arch: str) -> None:
    model_dir = tiny_model_dirs[arch]
    runner = _runner(model_dir)
    driver = _Driver(runner)
    greedy = SamplingParams(temperature=0.0)
    driver.add("a", PROMPT_A, greedy)
    driver.add("b", PROMPT_B, greedy)

    out = driver.step({"b": 5, "a": 6})  # b's whole prompt, a's first chunk
    assert set(out.sampled_token_ids) == {"b"}  # a partial prefill chunk samples nothing
    out = driver.step({"b": 1, "a": 4})  # b decodes, a's second chunk
    assert set(out.sampled_token_ids) == {"b"}
    out = driver.step({"b": 1, "a": 3})  # b decodes, a's last chunk samples
    assert set(out.sampled_token_ids) == {"a", "b"}
    for _ in range(6):
        driver.step({"b": 1, "a": 1})

    tokens_a = driver.reqs["a"]["token_ids"][len(PROMPT_A):]
    tokens_b = driver.reqs["b"]["token_ids"][len(PROMPT_B):]
    assert len(tokens_a) == 7 and len(tokens_b) == 9
    assert runner.requests["a"].token_ids == driver.reqs["a"]["token_ids"]  # the runner's own state
    hf_a, hf_b = _hf_greedy(model_dir, PROMPT_A, 7), _hf_greedy(model_dir, PROMPT_B, 9)
    assert len(hf_a) >= 3 and len(hf_b) >= 3
    assert tokens_a[:len(hf_a)] == hf_a
    assert tokens_b[:len(hf_b)] == hf_b

    driver.step({"a": 1}, finished={"b"})
    assert "b" not in runner.requests


def test_logprobs_match_hf(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["qwen2"]
    runner = _runner(model_dir)
    driver = _Driver(runner)
    driver.add("a", PROMPT_A, SamplingParams(temperature=0.0, logprobs=2))
    driver.add("b", PROMPT_B, SamplingParams(temperature=0.0))  # asked for none: gets none
    out = driver.step({"a": len(PROMPT_A), "b": len(PROMPT_B)})
    assert set(out.logprobs) == {"a"}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT_A])).logits[0, -1].log_softmax(-1)
    top = expected.topk(2)
    entry = out.logprobs["a"]
    assert list(entry) == top.indices.tolist()  # greedy: the sampled token is the top one
    assert out.sampled_token_ids["a"] == top.indices[0].item()
    for token_id, logprob in entry.items():
        assert abs(logprob - expected[token_id].item()) < 1e-4


def _seeded_run(runner: ModelRunner, num_tokens: int, companion: bool, preempt_after: int | None) -> list[int]:
    driver = _Driver(runner, seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    driver.add("s", PROMPT_A, params, seed=1234)
    if companion:
        driver.add("c", PROMPT_B, SamplingParams(temperature=0.9), seed=7)
    plan = {"s": len(PROMPT_A), **({"c": len(PROMPT_B)} if companion else {})}
    for i in range(num_tokens):
        if i == preempt_after:
            # Preempted: the runner drops it, then it comes back as new with its outputs, recomputed.
            tokens = driver.reqs["s"]["token_ids"]
            driver.step({"c": 1} if companion else {}, finished={"s"})
            driver.add("s", tokens, params, seed=1234, num_prompt_tokens=len(PROMPT_A))
            plan["s"] = len(tokens)
        driver.step(plan)
        plan = {req_id: 1 for req_id in plan}
    return driver.reqs["s"]["token_ids"][len(PROMPT_A):]


def test_seeded_sampling_is_batch_and_preemption_invariant(tiny_model_dirs: dict[str, Path]) -> None:
    runner = _runner(tiny_model_dirs["mistral"])
    alone = _seeded_run(runner, 8, companion=False, preempt_after=None)
    assert len(set(alone)) > 1  # really sampled, not a constant greedy loop
    runner.requests.clear()
    assert _seeded_run(runner, 8, companion=True, preempt_after=None) == alone
    runner.requests.clear()
    assert _seeded_run(runner, 8, companion=True, preempt_after=4) == alone


def test_cpu_kv_blocks_from_budget(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["qwen3"]  # 2 layers, 2 KV heads, head_dim 32, float32
    config = EngineConfig(model=str(model_dir), device="cpu", block_size=16, cpu_kv_cache_gb=0.01)
    runner = ModelRunner(config, ModelFiles(str(model_dir), model_dir), AutoConfig.from_pretrained(model_dir), max_model_len=256)
    block_bytes = 2 * 2 * 2 * 16 * 32 * 4
    assert runner.num_kv_blocks_from_memory() == int(0.01 * (1 << 30)) // block_bytes
    runner.allocate_kv_cache(3)
    assert runner.kv_cache is not None and runner.kv_cache.shape == (2, 2, 3, 2, 16, 32)


def test_profile_run_leaves_no_state(tiny_model_dirs: dict[str, Path]) -> None:
    """The memory-profile step (used on CUDA) runs on any device and cleans up after itself."""
    model_dir = tiny_model_dirs["llama"]
    config = EngineConfig(model=str(model_dir), device="cpu", block_size=16, max_num_batched_tokens=96,
                          max_num_seqs=4)
    runner = ModelRunner(config, ModelFiles(str(model_dir), model_dir), AutoConfig.from_pretrained(model_dir), max_model_len=40)
    temp_bytes = runner.profile_run()
    assert temp_bytes == 6 * runner.kv_block_bytes  # 96 tokens as 3 sequences of 32: 2 blocks each
    assert runner.requests == {} and runner.kv_cache is None
    runner.allocate_kv_cache(NUM_BLOCKS)  # the real cache binds afterwards and serves requests
    driver = _Driver(runner)
    driver.add("a", PROMPT_A, SamplingParams(temperature=0.0))
    assert set(driver.step({"a": len(PROMPT_A)}).sampled_token_ids) == {"a"}


def test_pack_int64_views_start_on_16_byte_boundaries() -> None:
    from engine.model_runner import pack_int64

    parts = [torch.arange(3), torch.tensor([7, 8], dtype=torch.int32), torch.arange(5).view(1, 5),
             torch.empty(0, dtype=torch.int64), torch.tensor([-1])]
    views = pack_int64(parts, torch.device("cpu"), pin_memory=False)
    for part, view in zip(parts, views, strict=True):
        assert view.dtype == torch.int64
        assert view.tolist() == part.reshape(-1).tolist()
        # Triton specialises on 16-byte pointer alignment: every view must keep it whatever the sizes.
        assert (view.storage_offset() * view.element_size()) % 16 == 0
