"""GGUF weights as (HF tensor name, float32 tensor) pairs, the form engine.loader.load_weights takes.

The `gguf` package reads the file and dequantizes every type it knows (F32/F16/BF16, Q8_0, Q4_0, Q4_1,
Q5_x, the K-quants, ...); its tensor-name map translates llama.cpp's names back to HF's. What is left to
us is undoing llama.cpp's reordering of the q/k rows for the Llama architecture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import UnsupportedModelError

# llama.cpp's converter interleaves the two RoPE halves of each q/k head for these architectures
# (its kernels rotate adjacent pairs; HF rotates half against half), so the rows must be put back.
_PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")


def _hf_base_names(hf_config: Any) -> list[str]:
    """Every HF module name a Llama-family checkpoint may hold (weight/bias suffix left off)."""
    names = ["model.embed_tokens", "model.norm", "lm_head"]
    for i in range(int(hf_config.num_hidden_layers)):
        layer = f"model.layers.{i}"
        names += [f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm",
                  *(f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
                  *(f"{layer}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))]
    return names


def _gguf_to_hf_names(arch: str, hf_config: Any) -> dict[str, str]:
    import gguf

    arch_for_names = "llama" if arch == "mistral" else arch  # same tensor names; gguf has no "mistral"
    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch_for_names not in arch_ids:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not known to the gguf package")
    name_map = gguf.get_tensor_name_map(arch_ids[arch_for_names], int(hf_config.num_hidden_layers))
    mapping: dict[str, str] = {}
    for hf_name in _hf_base_names(hf_config):
        gguf_name = name_map.get_name(hf_name)
        if gguf_name is not None:
            mapping[gguf_name] = hf_name
    return mapping


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave of the rotary halves: rows [h, d/2, 2] -> [h, 2, d/2]."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


TENSOR_INDEX = "gguf_tensors.json"  # in ModelFiles.config_dir, written by model_files.prepare_gguf


def tensor_index(path: Path) -> dict[str, Any]:
    """Where each tensor lies in the file: {"architecture", "tensors": [[name, type, shape, offset]]}.

    Parsing a GGUF's metadata (its vocabulary and merges: ~100k strings) takes seconds; the index lets
    a later start memory-map the tensors directly."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_field = reader.get_field("general.architecture")
    return {"architecture": str(arch_field.contents()) if arch_field is not None else "",
            "tensors": [[t.name, int(t.tensor_type), list(t.data.shape), int(t.data_offset), t.data.dtype.str]
                        for t in reader.tensors]}


def gguf_tensors(path: Path, hf_config: Any, index: dict[str, Any] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the file, dequantized to float32, under its HF name (unknown names pass through
    unchanged, so the loader reports them)."""
    import gguf

    index = index if index is not None else tensor_index(path)
    arch = index["architecture"]
    names = _gguf_to_hf_names(arch, hf_config)
    heads = {"q_proj": int(hf_config.num_attention_heads),
             "k_proj": int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)}
    for name, type_id, shape, offset, dtype in index["tensors"]:
        tensor_type = gguf.GGMLQuantizationType(type_id)
        raw = np.memmap(path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))
        base, _, suffix = name.rpartition(".")
        hf_name = f"{names[base]}.{suffix}" if base in names else name
        try:
            values = gguf.quants.dequantize(raw, tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"GGUF tensor {name} has type {tensor_type.name}, which the gguf package cannot "
                f"dequantize: {exc}") from exc
        values = np.ascontiguousarray(values, dtype=np.float32)
        # F32 tensors come back as read-only views of the memory-mapped file; torch wants its own copy.
        weight = torch.from_numpy(values if values.flags.writeable else values.copy())
        projection = hf_name.rsplit(".", 2)[-2] if hf_name.count(".") >= 2 else ""
        if arch in _PERMUTED_QK_ARCHITECTURES and projection in heads:
            weight = unpermute_qk(weight, heads[projection])
        yield hf_name, weight
