"""Building blocks of the Llama family: linear layers that load their own HF shards, RMSNorm, RoPE.

Each parameter carries a `weight_loader(param, loaded_tensor, shard_id)` so checkpoint plumbing
(q/k/v -> qkv_proj, gate/up -> gate_up_proj) stays next to the layer that fuses them. On CUDA the
norms, RoPE and SiLU-and-mul run fused Triton kernels (kernels/fused_norm.py, rope.py, activation.py);
the CPU path keeps plain torch ops in HF's order, the correctness oracle."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

WeightLoader = Callable[[nn.Parameter, torch.Tensor, Any], None]

# "0" turns the fused kernels off on CUDA (plain torch ops, as on the CPU): the before/after switch of
# bench/decode_step.py. Read when a module is built, never per call.
FUSED_KERNELS_ENV = "TOKENRELAY_FUSED_KERNELS"


@functools.cache
def _fused_kernels_importable() -> bool:
    try:
        import kernels.activation
        import kernels.fused_norm
        import kernels.rope  # noqa: F401
    except Exception as exc:  # a broken Triton install must not take the engine down
        logger.warning("fused Triton kernels unavailable (%s); using torch ops", exc)
        return False
    return True


def use_fused_kernels(device: torch.device) -> bool:
    """Whether a module whose tensors live on `device` runs the fused Triton kernels (decided once, at
    construction: the model is built on its device)."""
    if device.type != "cuda" or os.environ.get(FUSED_KERNELS_ENV, "1") == "0":
        return False
    return _fused_kernels_importable()


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    # An attribute on the Parameter itself: the loader finds it by parameter name alone.
    param.weight_loader = loader  # type: ignore[attr-defined]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    if param.shape != loaded.shape:
        raise UnsupportedModelError(
            f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter of shape "
            f"{tuple(param.shape)}: the config.json does not describe these weights")
    param.data.copy_(loaded)


def _copy_shard(param: nn.Parameter, loaded: torch.Tensor, offset: int, size: int) -> None:
    if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
        raise UnsupportedModelError(
            f"checkpoint shard of shape {tuple(loaded.shape)} does not fit rows [{offset}, {offset + size}) "
            f"of a parameter of shape {tuple(param.shape)}: the config.json does not describe these weights")
    param.data[offset:offset + size].copy_(loaded)


class Linear(nn.Module):
    """y = x @ W.T + b with uninitialised storage: every value comes from the checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            set_weight_loader(self.bias, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several HF projections of the same input stacked on the output dim (gate_proj, up_proj).

    shard_id is the index of the projection in `output_sizes`."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(self.output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        assert isinstance(shard_id, int), f"MergedLinear shard_id must be an int, got {shard_id!r}"
        offset = sum(self.output_sizes[:shard_id])
        _copy_shard(param, loaded, offset, self.output_sizes[shard_id])


class QKVLinear(Linear):
    """q_proj, k_proj and v_proj fused: output rows [q: H*D | k: H_kv*D | v: H_kv*D]."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool = False) -> None:
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        offsets = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                   "v": (self.q_size + self.kv_size, self.kv_size)}
        assert shard_id in offsets, f"QKVLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}"
        _copy_shard(param, loaded, *offsets[shard_id])


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return F.embedding(input_ids, self.weight)


class RMSNorm(nn.Module):
    """HF numerics: normalise in float32, cast back to the input dtype, then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)
        self.is_fused = use_fused_kernels(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., hidden] -> same
        if self.is_fused:
            from kernels.fused_norm import rms_norm

            return rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x) for x, residual [T, hidden]. The fused kernel writes the
        sum into `residual` in place: callers pass the residual stream and use only what comes back."""
        if self.is_fused:
            from kernels.fused_norm import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        residual = residual + x  # HF's operand order: hidden_states = residual + hidden_states
        return self(residual), residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2*I] -> [T, I]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32, computed exactly as HF does (same op order), so
    cos/sin and therefore greedy tokens match HF bit for bit in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope_theta ** exponents)
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    assert rope_scaling is not None
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        factor = rope_scaling["factor"]
        low_freq_factor, high_freq_factor = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise UnsupportedModelError(
        f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate_half), one instance shared by every layer. On the torch path cos/sin are
    computed per step from the positions in float32, like HF; the fused path reads a [max_positions,
    head_dim] cos|sin table built once on the device with the same ops, so the values are identical
    (40960 rows for Qwen3: 21 MB; 131072 for Llama 3.1: 67 MB)."""

    inv_freq: torch.Tensor  # [head_dim // 2] float32
    cos_sin_cache: torch.Tensor | None  # [max_positions, head_dim] float32 on the fused path

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None,
                 max_positions: int) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling)
        # float32 whatever the model dtype; not part of the checkpoint.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        cos_sin_cache = None
        if use_fused_kernels(inv_freq.device):
            from kernels.rope import build_cos_sin_cache, supports_head_dim

            if supports_head_dim(head_dim):
                cos_sin_cache = build_cos_sin_cache(inv_freq, max_positions)
        self.register_buffer("cos_sin_cache", cos_sin_cache, persistent=False)
        self.is_fused = cos_sin_cache is not None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T]; q [T, H, D]; k [T, H_kv, D]
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2] fp32
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos = emb.cos().to(q.dtype)[:, None, :]  # [T, 1, D], applied in the model dtype like HF
        sin = emb.sin().to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def norm_and_rotate_(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         q_norm: RMSNorm | None, k_norm: RMSNorm | None, *,
                         v: torch.Tensor | None = None, k_cache: torch.Tensor | None = None,
                         v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """Fused path: optional per-head RMSNorm (Qwen3) then RoPE, in place on q [T, H, D] and
        k [T, H_kv, D], one kernel launch. Given v [T, H_kv, D], a layer's paged cache (and its fp8
        scales) and slot_mapping [T], the same launch stores the rotated k and v at their slots."""
        from kernels.rope import qk_norm_rope

        assert self.cos_sin_cache is not None, "norm_and_rotate_ needs the fused path (is_fused)"
        qk_norm_rope(q, k, positions, self.cos_sin_cache,
                     q_norm.weight if q_norm is not None else None,
                     k_norm.weight if k_norm is not None else None,
                     q_norm.eps if q_norm is not None else 0.0,
                     value=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                     k_scale=k_scale, v_scale=v_scale)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
