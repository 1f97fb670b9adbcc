"""engine.hf_config against transformers' AutoConfig: the same values for the tiny checkpoints of every
supported architecture and for sparse or old-style config.json files; and an engine core built in a child
process never imports transformers."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.errors import UnsupportedModelError
from engine.hf_config import HFConfig, load_hf_config, read_hf_config
from engine.model_files import ModelFiles
from engine.models.llama import LlamaModelConfig
from tests.helpers.core_probe import report_core_modules
from tests.helpers.embedded_model import embedded_files
from tests.helpers.tiny_models import ARCHITECTURES

ARCH_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}


def _auto_value(auto: Any, name: str) -> Any:
    """What the engine read off an AutoConfig for HFConfig's field `name` (getattr with the same
    fallbacks LlamaModelConfig.from_hf applies)."""
    heads = auto.num_attention_heads
    if name == "architectures":
        return tuple(auto.architectures or ())
    if name == "head_dim":
        return getattr(auto, "head_dim", None) or auto.hidden_size // heads
    if name == "num_key_value_heads":
        return getattr(auto, "num_key_value_heads", None) or heads
    if name in ("attention_bias", "mlp_bias", "use_sliding_window"):
        return getattr(auto, name, False)
    if name == "sliding_window":
        return getattr(auto, name, None)
    return getattr(auto, name)


def assert_same_as_auto_config(model_dir: Path) -> HFConfig:
    from transformers import AutoConfig

    ours, auto = read_hf_config(model_dir), AutoConfig.from_pretrained(model_dir)
    for f in dataclasses.fields(HFConfig):
        assert getattr(ours, f.name) == _auto_value(auto, f.name), f"{model_dir.name}: {f.name}"
    # And what the model is built from, through both.
    assert LlamaModelConfig.from_hf(ours) == LlamaModelConfig.from_hf(auto)
    return ours


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_checkpoints_read_as_auto_config(tiny_model_dirs: dict[str, Path], arch: str) -> None:
    ours = assert_same_as_auto_config(tiny_model_dirs[arch])
    assert ours.model_type == arch and ours.architectures == (ARCH_NAMES[arch],)
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_key_value_heads) == (64, 2, 2)


def test_embedded_gguf_config_reads_as_auto_config() -> None:
    """The default model's config.json, as prepare_gguf derived it from the GGUF's metadata."""
    ours = assert_same_as_auto_config(embedded_files().config_dir)
    assert ours.architectures == ("LlamaForCausalLM",) and ours.num_hidden_layers == 30  # SmolLM2-135M


def _write_config(path: Path, config: dict[str, Any]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# Hand-written configs: every default of a class, the pre-transformers-5 rope form, and the fields whose
# defaults differ by architecture (Qwen3's head_dim 128, Mistral's window, Qwen's unused window).
SPARSE_CONFIGS: dict[str, dict[str, Any]] = {
    **{f"{t}-defaults": {"model_type": t, "architectures": [a]} for t, a in ARCH_NAMES.items()},
    "llama2-old-style": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                         "num_attention_heads": 8, "rope_theta": 500000, "vocab_size": 1000,
                         "rope_scaling": {"type": "linear", "factor": 2.0}, "max_position_embeddings": 4096},
    "llama3-no-original-len": {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0}, "rope_theta": 500000.0,
                               "num_key_value_heads": 8, "attention_bias": True, "mlp_bias": True},
    "mistral-no-window": {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                          "sliding_window": None, "head_dim": None},
    "qwen2-sliding": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True,
                      "sliding_window": 1024, "max_window_layers": 40, "tie_word_embeddings": True},
    "qwen2-window-unused": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 1024},
    "qwen3-new-style": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
}


@pytest.mark.parametrize("name", sorted(SPARSE_CONFIGS))
def test_sparse_configs_read_as_auto_config(tmp_path: Path, name: str) -> None:
    assert_same_as_auto_config(_write_config(tmp_path / name, SPARSE_CONFIGS[name]))


def test_defaults_that_differ_by_architecture(tmp_path: Path) -> None:
    """The values the side-by-side test would also accept if both readers were wrong the same way."""
    qwen3 = read_hf_config(_write_config(tmp_path / "q3", SPARSE_CONFIGS["qwen3-defaults"]))
    assert (qwen3.head_dim, qwen3.sliding_window, qwen3.max_position_embeddings) == (128, None, 32768)
    mistral = read_hf_config(_write_config(tmp_path / "m", SPARSE_CONFIGS["mistral-defaults"]))
    assert (mistral.head_dim, mistral.num_key_value_heads, mistral.sliding_window) == (128, 8, 4096)
    old = read_hf_config(_write_config(tmp_path / "old", SPARSE_CONFIGS["llama2-old-style"]))
    assert old.rope_parameters == {"type": "linear", "factor": 2.0, "rope_theta": 500000, "rope_type": "linear"}
    llama3 = read_hf_config(_write_config(tmp_path / "l3", SPARSE_CONFIGS["llama3-no-original-len"]))
    assert llama3.rope_parameters["original_max_position_embeddings"] == 2048  # max_position_embeddings


def test_unreadable_configs_name_the_problem(tmp_path: Path) -> None:
    gpt2 = _write_config(tmp_path / "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, mistral, qwen2, qwen3"):
        load_hf_config(ModelFiles("gpt2", gpt2))
    typo = _write_config(tmp_path / "typo", {"model_type": "llama", "hidden_size": "4096"})
    with pytest.raises(ValueError, match=r"cannot read the model config of 'typo'.*hidden_size='4096'"):
        load_hf_config(ModelFiles("typo", typo))
    with pytest.raises(ValueError, match=r"cannot read the model config of 'empty'"):
        load_hf_config(ModelFiles("empty", tmp_path))


def test_engine_core_process_never_imports_transformers(tiny_model_dir: Path) -> None:
    config = EngineConfig(model=str(tiny_model_dir), device="cpu", num_kv_blocks=16)
    ctx = mp.get_context("spawn")  # a fresh interpreter, as MPEngine starts its core
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=report_core_modules, args=(config, ModelFiles(str(tiny_model_dir), tiny_model_dir),
                                                          sender))
    child.start()
    sender.close()
    try:
        assert receiver.poll(120), "the child built no engine core"
        num_kv_blocks, packages = receiver.recv()
    finally:
        child.join(30)
    assert num_kv_blocks == 16
    assert "torch" in packages and "engine" in packages  # it did build the core here
    assert "transformers" not in packages
