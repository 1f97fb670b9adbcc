"""The model wired to the fused kernels (residual stream, in-place q/k, shared RoPE table) computes
what the torch path computes. Both paths are forced, so this runs on the CPU (kernels under the
interpreter) and on a GPU alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.attention
import engine.models.layers
import engine.models.llama
from engine.attention import AttentionMetadata
from engine.hf_config import load_hf_config
from engine.loader import load_model
from engine.model_files import ModelFiles
from engine.models import LlamaForCausalLM
from engine.models.llama import LlamaDecoderLayer
from kernels.reference import FP8_DTYPE, dequantize_fp8_rows
from tests.helpers.tiny_models import make_tiny_model


def _layers(model: LlamaForCausalLM) -> list[LlamaDecoderLayer]:
    return [layer for layer in model.model.layers if isinstance(layer, LlamaDecoderLayer)]


def _bind_cache(model: LlamaForCausalLM, num_blocks: int, block_size: int, cache_dtype: torch.dtype,
                device: torch.device) -> None:
    cfg = model.config
    for layer in _layers(model):
        attn = layer.self_attn.attn
        shape = (num_blocks, cfg.num_kv_heads, block_size)
        attn.k_cache = torch.zeros(*shape, cfg.head_dim, device=device).to(cache_dtype)
        attn.v_cache = torch.zeros_like(attn.k_cache)
        if cache_dtype == FP8_DTYPE:
            attn.k_scale, attn.v_scale = torch.zeros(shape, device=device), torch.zeros(shape, device=device)


def _caches(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """Every layer's K and V as the attention reads them (fp8 values times their scales)."""
    out = []
    for layer in _layers(model):
        attn = layer.self_attn.attn
        for cache, scale in ((attn.k_cache, attn.k_scale), (attn.v_cache, attn.v_scale)):
            out.append(cache.float() if scale is None else dequantize_fp8_rows(cache, scale))
    return out


def _prefill_then_decode(model: LlamaForCausalLM, prompt: list[int], next_id: int, cache_dtype: torch.dtype,
                         device: torch.device) -> list[torch.Tensor]:
    """Hidden states of a prompt's prefill and of one decode step over the cache it wrote."""
    block_size, num_tokens = 16, len(prompt)
    _bind_cache(model, num_blocks=4, block_size=block_size, cache_dtype=cache_dtype, device=device)
    block_tables = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32)
    outs = []
    for ids, start in ((prompt, 0), ([next_id], num_tokens)):
        positions = torch.arange(start, start + len(ids))
        slots = block_tables[0, positions // block_size].long() * block_size + positions % block_size
        meta = AttentionMetadata(slot_mapping=slots.to(device),
                                 query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32, device=device),
                                 seq_lens=torch.tensor([start + len(ids)], dtype=torch.int32, device=device),
                                 block_tables=block_tables.to(device), max_query_len=len(ids),
                                 max_seq_len=start + len(ids))
        with torch.inference_mode():
            outs.append(model(torch.tensor(ids, device=device), positions.to(device), meta))
    return outs


def _load(model_dir: Path, device: torch.device, is_fused: bool, monkeypatch: pytest.MonkeyPatch
          ) -> LlamaForCausalLM:
    with monkeypatch.context() as patch:
        for module in (engine.models.layers, engine.models.llama):
            patch.setattr(module, "use_fused_kernels", lambda device: is_fused)
        files = ModelFiles(str(model_dir), model_dir)
        return load_model(files, load_hf_config(files), torch.float32, device)


@pytest.mark.parametrize("cache_dtype", [torch.float32, FP8_DTYPE])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fused_model_matches_torch_path(arch: str, cache_dtype: torch.dtype, tmp_path: Path,
                                        device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused path also writes the KV cache from its RoPE kernel (Attention skips its own write):
    the cache it leaves matches the torch path's, and so do the hidden states read through it."""
    model_dir = make_tiny_model(arch, tmp_path / arch)
    plain = _load(model_dir, device, False, monkeypatch)
    fused = _load(model_dir, device, True, monkeypatch)
    fused_layers = _layers(fused)
    assert len(fused_layers) == fused.config.num_layers >= 2
    rotary = fused_layers[0].self_attn.rotary_emb
    assert rotary.is_fused and fused.model.norm.is_fused and fused_layers[0].mlp.is_fused
    assert all(layer.self_attn.rotary_emb is rotary for layer in fused_layers), "one shared table"
    assert not plain.model.norm.is_fused and not _layers(plain)[0].self_attn.rotary_emb.is_fused
    prompt = [5, 17, 3, 99, 42, 7, 8, 120, 64, 1, 2, 33, 71, 90, 11, 12, 13, 14]  # crosses a block
    # The attention layer's own cache write runs on the torch path only: the fused path's cache comes
    # from the RoPE kernel.
    write_kv, paged = engine.attention.get_attention_ops(device.type)
    writes: list[int] = []

    def counting_write(*args: object, **kwargs: object) -> None:
        writes.append(1)
        write_kv(*args, **kwargs)

    monkeypatch.setattr(engine.attention, "get_attention_ops", lambda device_type: (counting_write, paged))
    expected = _prefill_then_decode(plain, prompt, next_id=23, cache_dtype=cache_dtype, device=device)
    assert writes, "the torch path writes through the attention layer"
    writes.clear()
    got = _prefill_then_decode(fused, prompt, next_id=23, cache_dtype=cache_dtype, device=device)
    assert not writes, "the fused path wrote the cache from its RoPE kernel, not from the attention layer"
    for want, have in zip(_caches(plain), _caches(fused), strict=True):
        assert have.abs().sum() > 0, "the fused path wrote the cache"
        diff = (have - want).abs()
        if cache_dtype == FP8_DTYPE:
            # A k whose last fp32 bit differs from the torch path's (rsqrt, fma on a GPU) may round to
            # the neighbouring e4m3 value (2**-3 relative); almost every value is the same.
            assert (diff <= 1e-4 + 2.0**-3 * want.abs()).all()
            assert (diff > 1e-4 + 1e-4 * want.abs()).float().mean() < 0.01
        else:
            torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
    # One e4m3 step in one key moves a score by ~1e-2 at most, so fp8 hidden states get that margin.
    tol = 1e-4 if cache_dtype == torch.float32 else 2e-2
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, atol=tol, rtol=tol)
