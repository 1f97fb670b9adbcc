"""Checkpoint loading: build our model for a resolved ModelFiles and fill every parameter through its
weight_loader, from the *.safetensors files or from a GGUF file dequantized to the engine dtype.

Both sources yield (HF tensor name, tensor) pairs, so one loop checks names, shapes and completeness."""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.distributed import TPInfo
from engine.errors import UnsupportedModelError
from engine.gguf_weights import TENSOR_INDEX, gguf_tensors
from engine.model_files import ModelFiles
from engine.models import LlamaForCausalLM, get_model_class
from engine.models.layers import default_weight_loader

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """EngineConfig.dtype -> torch dtype; "auto" is bf16 on CUDA and fp32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    # Mistral repos ship consolidated.safetensors (another naming scheme) beside the HF shards.
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise UnsupportedModelError(
            f"no *.safetensors files in {model_dir}; convert the checkpoint with save_pretrained("
            f"..., safe_serialization=True)")
    return files


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(files: ModelFiles, hf_config: Any, dtype: torch.dtype, device: str | torch.device,
               tp: TPInfo | None = None, load_format: str = "auto") -> LlamaForCausalLM:
    """Build the model for hf_config on `device` in `dtype` (this rank's shard of it under tensor
    parallelism) and load its weights from `files`, or random ones for load_format "dummy"."""
    model_cls = get_model_class(hf_config)
    # Parameters are created directly on the device in the target dtype; RoPE's inv_freq stays float32.
    with torch.device(device), _default_dtype(dtype):
        model = model_cls.from_hf_config(hf_config, tp)
    tensors: Iterable[tuple[str, torch.Tensor]]
    if load_format == "dummy":
        tensors = dummy_tensors(model_cls.checkpoint_shapes(model.config), dtype, torch.device(device))
    elif files.gguf_file is not None:
        tensors = gguf_tensors(files.gguf_file, hf_config, _read_index(files.config_dir / TENSOR_INDEX))
    else:
        tensors = safetensors_tensors(safetensors_files(files.config_dir))
    load_weights(model, tensors)
    return model.eval()


def dummy_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                  seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Random full-size tensors, one name at a time, made on `device` (a 70B model's are made in seconds
    on a GPU, and never all at once). Each is a function of (seed, name) only, so every rank cuts its
    shard out of the same model and a tensor-parallel engine computes what one GPU would. Matrices have
    std 1/sqrt(fan_in), so activations stay O(1) at any width; norms are 1, biases small."""
    for name, shape in shapes.items():
        generator = torch.Generator(device=device).manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        std = 1.0 if "embed_tokens" in name else (shape[1] ** -0.5 if len(shape) == 2 else 0.02)
        tensor = torch.empty(shape, dtype=torch.float32 if device.type == "cpu" else dtype, device=device)
        yield name, tensor.normal_(0.0, std, generator=generator).to(dtype)


def _read_index(path: Path) -> dict[str, Any] | None:
    try:
        index: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gguf_tensors parses the file itself
    return index


def safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Every (HF name, tensor) through its parameter's weight_loader; unknown or missing names fail."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    is_tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if "rotary_emb.inv_freq" in name or (is_tied and name == "lm_head.weight"):
            continue  # recomputed / shared with embed_tokens
        param_name, shard_id = _to_param_name(name, packed)
        if param_name not in params:
            unexpected.append(name)
            continue
        param = params[param_name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, shard_id)
        loaded.add(name)
    if unexpected:
        raise UnsupportedModelError(
            f"checkpoint has {len(unexpected)} weights this model does not use (e.g. {unexpected[:5]}); "
            f"its config.json does not match our implementation of {type(model).__name__}")
    missing = sorted(_expected_checkpoint_names(model, packed) - loaded)
    if missing:
        raise UnsupportedModelError(
            f"checkpoint is missing {len(missing)} weights: {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}")


def _to_param_name(name: str, packed: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    for hf_module, (our_module, shard_id) in packed.items():
        if f".{hf_module}." in name:
            return name.replace(f".{hf_module}.", f".{our_module}."), shard_id
    return name, None


def _expected_checkpoint_names(model: nn.Module, packed: dict[str, tuple[str, Any]]) -> set[str]:
    """HF names of every tensor the model needs: fused parameters expand back to their shards."""
    unpacked: dict[str, list[str]] = {}
    for hf_module, (our_module, _) in packed.items():
        unpacked.setdefault(our_module, []).append(hf_module)
    names: set[str] = set()
    for param_name, _ in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        for our_module, hf_modules in unpacked.items():
            if f".{our_module}." in param_name:
                names.update(param_name.replace(f".{our_module}.", f".{m}.") for m in hf_modules)
                break
        else:
            names.add(param_name)
    return names
