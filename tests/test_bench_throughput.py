"""bench/throughput.py and bench/workload.py pieces on the CPU: the prefill-heavy draw (the issue's token
counts), the FLOP and byte counts of the rooflines, config parsing and switches, and the prefill-kernel
probe running the engine's kernels (under the Triton interpreter)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.throughput import SWITCH_ENVS, RunConfig, prefill_kernel_rate
from bench.workload import (
    MODEL_SHAPES,
    Workload,
    kv_bytes_per_token,
    named_workload,
    num_parameters,
    prefill_flops,
    roofline_bytes,
    write_config_dir,
)


def test_workloads_draw_as_the_benchmark_does() -> None:
    # Token counts quoted in issue 13 and shared/DESIGN.md for random.Random(0): prompt lengths, then
    # output lengths, then the ids.
    heavy = named_workload("prefill-heavy")
    assert (heavy.num_prompt_tokens, heavy.num_output_tokens) == (653_210, 20_125)
    assert min(map(len, heavy.prompts)) >= 1024 and max(map(len, heavy.prompts)) <= 4096
    assert min(heavy.output_lens) >= 32 and max(heavy.output_lens) <= 128
    bench = named_workload("benchmark")
    assert (bench.num_prompt_tokens, bench.num_output_tokens) == (144_831, 144_160)


def test_roofline_counts() -> None:
    shape = MODEL_SHAPES["qwen3-0.6b"]
    assert kv_bytes_per_token(shape) == 114_688  # PERFORMANCE.md: 28 x 2 x 8 x 128 x 2
    assert kv_bytes_per_token(shape, "fp8") == 28 * 2 * 8 * (128 + 4)
    one = Workload(prompts=[[0] * 10], output_lens=[3])
    kv, weights = roofline_bytes(one, shape, weight_bytes=100)
    assert kv == 114_688 * (10 + 11 + 12) and weights == 300
    # 28 layers of (qkv 1024x4096 + o 2048x1024 + gate_up 1024x6144 + down 3072x1024) per token, causal
    # attention over 1..10, the LM head once.
    layer = 1024 * 4096 + 2048 * 1024 + 1024 * 6144 + 3072 * 1024
    expected = 2 * 28 * layer * 10 + 4 * 28 * 16 * 128 * 55 + 2 * 151_936 * 1024
    assert prefill_flops(one, shape) == pytest.approx(expected)


def test_config_switches_set_and_clear_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SWITCH_ENVS.values():
        monkeypatch.delenv(name, raising=False)
    config = RunConfig.parse("fp8:split=512:causal=1:async=off")
    assert (config.kv_cache_dtype, config.async_scheduling) == ("fp8", False)
    config.apply()
    assert os.environ[SWITCH_ENVS["split"]] == "512" and os.environ[SWITCH_ENVS["causal"]] == "1"
    RunConfig.parse("auto").apply()
    assert not any(name in os.environ for name in SWITCH_ENVS.values())
    with pytest.raises(SystemExit, match="unknown switch"):
        RunConfig.parse("auto:warp=9")
    with pytest.raises(SystemExit, match="auto or fp8"):
        RunConfig.parse("int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check; the GPU runs it in the bench")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_prefill_kernel_probe_runs_the_kernel(kv_cache_dtype: str) -> None:
    workload = Workload(prompts=[[0] * 40, [0] * 30], output_lens=[1, 1])
    rate = prefill_kernel_rate(MODEL_SHAPES["tiny"], workload, 50, "cpu", kv_cache_dtype)
    assert (rate["num_seqs"], rate["num_tokens"]) == (2, 50) and rate["tflop_s"] > 0


def test_parameter_counts_match_the_models_hf_builds(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("tiny", "llama-3.2-1b"):
        write_config_dir(name, tmp_path / name)
        config = AutoConfig.from_pretrained(tmp_path / name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert num_parameters(MODEL_SHAPES[name]) == sum(p.numel() for p in model.parameters()), name
    assert not list((tmp_path / "tiny").glob("*.safetensors"))  # a config directory: no weights
    # Llama-3-70B: 70.55 B parameters, 141 GB in bf16 (the tensor-parallel shape).
    assert num_parameters(MODEL_SHAPES["llama-3-70b"]) == 70_553_706_496
