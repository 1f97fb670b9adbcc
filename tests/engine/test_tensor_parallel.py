"""Tensor parallelism on the CPU (gloo, fp32): TP=2 and TP=4 give the greedy tokens of TP=1 on every
architecture, with fewer KV heads than ranks (replicated) and a vocabulary the ranks do not divide
(padded); dummy weights are the same model at every TP size; a rank that dies ends the engine.

Every TP engine spawns a process per rank (seconds each on a small CI box), so one engine serves each
case's whole batch, and the rarer combinations are marked `reliability` (CI runs them)."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, SamplingParams
from engine.async_engine import AsyncEngine
from engine.llm_engine import LLMEngine
from engine.outputs import FinishReason, RequestOutput
from tests.helpers.tiny_models import make_tiny_model

# Mixed lengths, a shared prefix (prefix-cache hit) and a prompt longer than one step's budget (chunked).
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 120)), [5, 6, 7, 8, 9, 10] * 3 + [40, 41]]
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
# The driver's other sampling paths: a penalty (reads the outputs on the host) and logprobs.
PENALISED = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, repetition_penalty=1.3, logprobs=2)


def _config(model: Path, tp: int, **overrides: object) -> EngineConfig:
    knobs: dict[str, object] = dict(model=str(model), num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=48,
                                    max_model_len=256, tensor_parallel_size=tp)
    return EngineConfig(**{**knobs, **overrides})  # type: ignore[arg-type]


def _greedy_tokens(config: EngineConfig) -> list[list[int]]:
    return [tokens for tokens, _ in _greedy_outputs(config)]


def _greedy_outputs(config: EngineConfig) -> list[tuple[list[int], list[dict[int, float]] | None]]:
    engine = LLMEngine(config)
    try:
        outputs = engine.generate(PROMPTS, [GREEDY] * (len(PROMPTS) - 1) + [PENALISED])
        return [(out.token_ids, out.logprobs) for out in outputs]
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("arch", "tp"), [
    ("llama", 2), ("qwen3", 4),
    pytest.param("qwen3", 2, marks=pytest.mark.reliability),
    pytest.param("qwen2", 4, marks=pytest.mark.reliability),
    pytest.param("mistral", 2, marks=pytest.mark.reliability),
    pytest.param("qwen2", 2, marks=pytest.mark.reliability),
    pytest.param("llama", 4, marks=pytest.mark.reliability),
    pytest.param("mistral", 4, marks=pytest.mark.reliability),
])
def test_greedy_tokens_equal_one_rank(tiny_model_dirs: dict[str, Path], arch: str, tp: int) -> None:
    """The tiny models have 4 heads and 2 KV heads: at TP=4 each KV head is replicated on two ranks."""
    model = tiny_model_dirs[arch]
    expected = _greedy_outputs(_config(model, 1))
    assert len({tuple(t) for t, _ in expected}) > 1, "the prompts should not all give the same tokens"
    got = _greedy_outputs(_config(model, tp))
    assert [t for t, _ in got] == [t for t, _ in expected]
    want_logprobs, got_logprobs = expected[-1][1], got[-1][1]
    assert want_logprobs is not None and got_logprobs is not None and len(got_logprobs) == GREEDY.max_tokens
    for want, have in zip(want_logprobs, got_logprobs, strict=True):
        assert want.keys() == have.keys() and all(abs(want[k] - have[k]) < 1e-4 for k in want)


@pytest.mark.reliability
def test_one_kv_head_and_a_vocabulary_the_ranks_do_not_divide(tmp_path: Path) -> None:
    """MQA (one KV head on 4 ranks) and 322 ids over 4 ranks (81 each, the last 2 rows padding)."""
    model = make_tiny_model("llama", tmp_path / "mqa", num_key_value_heads=1, vocab_size=322)
    assert _greedy_tokens(_config(model, 4)) == _greedy_tokens(_config(model, 1))


def test_dummy_weights_are_the_same_model_at_every_tp_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    """load_format="dummy" reads no weights (a config directory is enough), and every rank cuts its shard
    from the same random tensors."""
    config_dir = tmp_path / "config-only"
    config_dir.mkdir()
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            (config_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    one = _greedy_tokens(_config(config_dir, 1, load_format="dummy"))
    assert one != _greedy_tokens(_config(tiny_model_dir, 1))  # not the checkpoint's weights
    assert _greedy_tokens(_config(config_dir, 2, load_format="dummy")) == one


@pytest.mark.parametrize(("tp", "message"), [
    (3, r"tensor_parallel_size=3 does not divide num_attention_heads=4, num_key_value_heads=2 \(nor is it "
        r"divided by it\), intermediate_size=128; choose a size"),
    (8, "tensor_parallel_size=8 does not divide num_attention_heads=4; choose a size"),
])
def test_sizes_that_do_not_split_the_heads_fail_before_any_rank_starts(tiny_model_dir: Path, tp: int,
                                                                        message: str) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match=message):
        LLMEngine(_config(tiny_model_dir, tp))
    assert time.monotonic() - started < 5.0, "a rank process was started before the sizes were checked"


def test_tensor_parallel_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_a_rank_that_dies_ends_the_engine_with_an_error(tiny_model_dir: Path) -> None:
    engine = AsyncEngine(_config(tiny_model_dir, 2))
    engine.start()
    try:
        executor = engine.core._tp_executor
        assert executor is not None
        outputs: list[RequestOutput] = []
        engine.submit("before", prompt_token_ids=[5, 6, 7], params=GREEDY, on_output=outputs.append)
        _wait_for(lambda: bool(outputs) and outputs[-1].finished, "the first request")
        assert outputs[-1].finish_reason == FinishReason.LENGTH
        rank_pid = executor.rank_pids[0]
        assert rank_pid is not None
        os.kill(rank_pid, signal.SIGKILL)
        failed: list[RequestOutput] = []
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        engine.submit("after", prompt_token_ids=[5, 6, 7], params=long, on_output=failed.append)
        _wait_for(lambda: bool(failed) and failed[-1].finished, "the request after the kill to end")
        assert failed[-1].finish_reason == FinishReason.ERROR
        assert "tensor-parallel rank 1" in (failed[-1].error or "") and "died" in (failed[-1].error or "")
        assert engine.error is not None and not engine.is_running
        with pytest.raises(RuntimeError, match="the engine loop has died"):
            engine.submit("refused", prompt_token_ids=[5], params=GREEDY, on_output=failed.append)
    finally:
        engine.shutdown()


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_one_tensor_parallel_engine_per_process_and_a_dropped_one_stops_its_ranks(tiny_model_dir: Path) -> None:
    first = LLMEngine(_config(tiny_model_dir, 2))
    with pytest.raises(RuntimeError, match="already runs in this process"):
        LLMEngine(_config(tiny_model_dir, 2))
    assert first.generate([[5, 6, 7]], GREEDY)[0].finish_reason == FinishReason.LENGTH  # its group intact
    executor = first.core._tp_executor
    assert executor is not None
    pids = [pid for pid in executor.rank_pids if pid is not None]
    del first, executor
    gc.collect()
    _wait_for(lambda: not any(_alive(pid) for pid in pids), "the dropped engine's ranks to exit")
    LLMEngine(_config(tiny_model_dir, 2)).shutdown()  # and the process may start another


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_loads_its_shard_of_a_gguf(tiny_model_dirs: dict[str, Path], tmp_path: Path, tp: int) -> None:
    """Every rank's parameters are its slice of the whole model's, loaded from a GGUF (llama.cpp's q/k
    row order undone first); no process group is needed to load."""
    from transformers import AutoConfig

    from engine.distributed import TPInfo
    from engine.gguf_weights import gguf_tensors, tensor_index
    from engine.loader import load_weights
    from engine.models import LlamaForCausalLM
    from tests.engine.test_gguf import write_gguf

    model_dir = tiny_model_dirs["llama"]
    path = write_gguf(model_dir, tmp_path / "llama.gguf", "llama")
    hf_config = AutoConfig.from_pretrained(model_dir)

    def load(tp_info: TPInfo) -> dict[str, torch.Tensor]:
        model = LlamaForCausalLM.from_hf_config(hf_config, tp_info)
        load_weights(model, gguf_tensors(path, hf_config, tensor_index(path)))
        return dict(model.named_parameters())

    whole = load(TPInfo())
    cfg = LlamaForCausalLM.from_hf_config(hf_config).config
    d, q, kv, inter = cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    for rank in range(tp):
        shard = load(TPInfo(rank, tp))
        first_kv = rank * cfg.num_kv_heads // tp
        num_kv = max(1, cfg.num_kv_heads // tp)
        for name, param in shard.items():
            full = whole[name]
            if "qkv_proj" in name:
                q_rows = full[:q].chunk(tp)[rank]
                k_rows = full[q + first_kv * d:q + (first_kv + num_kv) * d]
                v_rows = full[q + kv + first_kv * d:q + kv + (first_kv + num_kv) * d]
                expected = torch.cat([q_rows, k_rows, v_rows])
            elif "gate_up_proj" in name:
                expected = torch.cat([full[:inter].chunk(tp)[rank], full[inter:].chunk(tp)[rank]])
            elif "o_proj" in name or "down_proj" in name:
                expected = full.chunk(tp, dim=1)[rank]
            elif "embed_tokens" in name or "lm_head" in name:
                per_rank = -(-cfg.vocab_size // tp)
                expected = torch.zeros_like(param)
                rows = full[rank * per_rank:(rank + 1) * per_rank]
                expected[:len(rows)] = rows
            else:
                expected = full
            assert torch.equal(param, expected), (rank, name)
