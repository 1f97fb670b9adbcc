"""HFConfig: the fields of a checkpoint's config.json the engine reads, with the defaults of transformers'
config classes for the architectures we serve, parsed without importing transformers.

Why not AutoConfig: the engine core process deals in token ids only, and importing transformers there
(its import plus the lazy import-structure scan) cost seconds of every start-up. The values must still be
what AutoConfig gives, so a sparse hand-written config.json builds the same model either way:
tests/engine/test_hf_config.py reads configs both ways side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UnsupportedModelError
from engine.model_files import ModelFiles

# The defaults of LlamaConfig, MistralConfig, Qwen2Config and Qwen3Config (transformers 5) for every
# field read below. A field a class lacks gets the value our model assumes without it (no bias, no
# window): AutoConfig keeps such a key as a plain attribute when a config.json has it, so it counts too.
_COMMON: dict[str, Any] = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
    "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "sliding_window": None, "use_sliding_window": False,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "vocab_size": 32000, "intermediate_size": 11008, "max_position_embeddings": 2048},
    "mistral": {**_COMMON, "vocab_size": 32000, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "qwen2": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "sliding_window": 4096},
    "qwen3": {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "head_dim": 128, "max_position_embeddings": 32768, "sliding_window": 4096},
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_DEFAULTS))
DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
# RoPE types whose parameters carry the pre-training context length (transformers fills it in).
_ROPE_TYPES_WITH_ORIGINAL_LEN = ("llama3", "yarn", "longrope")


@dataclass(frozen=True)
class HFConfig:
    """config.json with defaults applied, under transformers' attribute names: code written against a
    transformers config (LlamaModelConfig.from_hf, gguf_weights) reads this one unchanged."""

    model_type: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    architectures: tuple[str, ...]  # e.g. ("LlamaForCausalLM",): engine.models picks the class by it
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # = num_attention_heads when the config has none (no GQA)
    head_dim: int  # = hidden_size // num_attention_heads when the config has none (Qwen3: 128)
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # None also where Qwen's use_sliding_window is false (as transformers does)
    use_sliding_window: bool
    # transformers 5's form, whichever form the file has: {"rope_type", "rope_theta", scaling keys ...}.
    rope_parameters: dict[str, Any] = field(default_factory=dict)


def load_hf_config(files: ModelFiles) -> HFConfig:
    """The checkpoint's config.json (for a GGUF: the one prepare_gguf derived from its metadata)."""
    try:
        return read_hf_config(files.config_dir)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the model config of {files.name!r}: {exc}") from exc


def read_hf_config(config_dir: Path) -> HFConfig:
    raw = json.loads((config_dir / "config.json").read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{config_dir / 'config.json'} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in _DEFAULTS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} (architectures {raw.get('architectures')}) in "
            f"{config_dir / 'config.json'} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    values = {**_DEFAULTS[model_type], **{k: raw[k] for k in _DEFAULTS[model_type] if k in raw}}
    hidden_size, num_heads = _int(values, "hidden_size"), _int(values, "num_attention_heads")
    max_positions = _int(values, "max_position_embeddings")
    is_sliding = _bool(values, "use_sliding_window")
    sliding_window = _optional_int(values, "sliding_window")
    if model_type in ("qwen2", "qwen3") and not is_sliding:
        sliding_window = None  # Qwen configs carry a window they do not use
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ValueError(f"config.json field architectures={architectures!r} is not a list of names")
    return HFConfig(
        model_type=model_type,
        architectures=tuple(architectures),
        vocab_size=_int(values, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_int(values, "intermediate_size"),
        num_hidden_layers=_int(values, "num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=_optional_int(values, "num_key_value_heads") or num_heads,
        head_dim=_optional_int(values, "head_dim") or hidden_size // num_heads,
        hidden_act=_str(values, "hidden_act"),
        rms_norm_eps=_float(values, "rms_norm_eps"),
        max_position_embeddings=max_positions,
        tie_word_embeddings=_bool(values, "tie_word_embeddings"),
        attention_bias=_bool(values, "attention_bias"),
        mlp_bias=_bool(values, "mlp_bias"),
        sliding_window=sliding_window,
        use_sliding_window=is_sliding,
        rope_parameters=_rope_parameters(raw, max_positions),
    )


def _rope_parameters(raw: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """transformers 5 folds rope_theta (and partial_rotary_factor) into one dict with the scaling keys;
    configs written by older versions, most on the hub, keep rope_theta and rope_scaling apart. The same
    merge as its convert_rope_params_to_dict + standardize_rope_params, so both forms read alike."""
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json rope parameters {rope!r} are not a JSON object")
    rope = dict(rope)
    rope.setdefault("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA))
    if "partial_rotary_factor" in raw:
        rope.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in _ROPE_TYPES_WITH_ORIGINAL_LEN:
        if "original_max_position_embeddings" in raw:  # a top-level value wins (Phi-3 style configs)
            rope["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", max_positions)
    return rope


# ---- typed field reads: a wrong type is a ValueError naming the field, as AutoConfig's strict check -------
def _int(values: dict[str, Any], name: str) -> int:
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass in Python
        raise ValueError(f"config.json field {name}={value!r} is not an integer")
    return value


def _optional_int(values: dict[str, Any], name: str) -> int | None:
    return None if values[name] is None else _int(values, name)


def _float(values: dict[str, Any], name: str) -> float:
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config.json field {name}={value!r} is not a number")
    return float(value)


def _bool(values: dict[str, Any], name: str) -> bool:
    value = values[name]
    if not isinstance(value, bool):
        raise ValueError(f"config.json field {name}={value!r} is not true or false")
    return value


def _str(values: dict[str, Any], name: str) -> str:
    value = values[name]
    if not isinstance(value, str):
        raise ValueError(f"config.json field {name}={value!r} is not a string")
    return value
