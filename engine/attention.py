"""Paged attention as a layer: AttentionMetadata (one per step, passed through forward) and Attention,
which writes this step's K/V into its layer's cache and attends over the paged context.

The CPU path runs kernels/reference.py; on CUDA the Triton kernels are imported lazily (reference if
the import fails). An fp8 cache comes with per-(token, head) scales that both paths read and write."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.reference import paged_attention_ref, write_kv_cache_ref

logger = logging.getLogger(__name__)

# Split-K balancing of the decode kernel (kernels/decode_attention.py DecodeConfig.max_partition_tokens):
# a token count caps every context partition, so a ragged batch's long contexts are split too. Unset or
# "0": the default split (only when the batch alone cannot fill the GPU). Read once per process; the
# A/B switch of scripts/gpu_h200.sh.
DECODE_PARTITION_TOKENS_ENV = "TOKENRELAY_DECODE_MAX_PARTITION_TOKENS"
# The prefill kernel runs its fully visible K/V tiles unmasked and each sequence's heaviest query tiles
# first (kernels/prefill_attention.py PrefillConfig.causal_split, the default since it measured 237 ->
# 288 TFLOP/s on an H200); "0" turns that off. Read once per process.
PREFILL_CAUSAL_SPLIT_ENV = "TOKENRELAY_PREFILL_CAUSAL_SPLIT"


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token (PAD_SLOT_ID: not written)
    query_start_loc: torch.Tensor  # [B+1] int32: cu_seqlens_q, token offsets of each sequence
    seq_lens: torch.Tensor  # [B] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_num_blocks] int32: block ids of each sequence
    max_query_len: int
    max_seq_len: int
    # Mixed batches: the leading sequences that compute one token each (decodes), which the GPU path
    # hands to the decode kernel, and a host bound of their lengths. 0: no such split.
    num_decodes: int = 0
    max_decode_seq_len: int = 0


WriteKV = Callable[..., None]  # (key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
PagedAttn = Callable[..., torch.Tensor]


def _paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         scale: float, max_query_len: int, max_seq_len: int,
                         out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None, num_decodes: int = 0,
                         max_decode_seq_len: int | None = None) -> torch.Tensor:
    # The reference takes no max lengths / out buffer / decode split (it treats every sequence alike);
    # adapt it to the Triton launcher's signature.
    result = paged_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                 k_scale, v_scale)
    if out is not None:
        out.copy_(result)
        return out
    return result


@functools.cache
def get_attention_ops(device_type: str) -> tuple[WriteKV, PagedAttn]:
    """(write_kv_cache, paged_attention) for a device type; resolved once per process."""
    if device_type == "cuda":
        try:
            from kernels.decode_attention import DecodeConfig
            from kernels.kv_cache import write_kv_cache
            from kernels.paged_attention import paged_attention
            from kernels.prefill_attention import PrefillConfig
        except Exception as exc:  # a broken Triton install must not take the engine down
            logger.warning("triton attention kernels unavailable (%s); using the torch reference", exc)
        else:
            max_partition_tokens = int(os.environ.get(DECODE_PARTITION_TOKENS_ENV) or 0)
            causal_split = os.environ.get(PREFILL_CAUSAL_SPLIT_ENV, "1") != "0"
            if max_partition_tokens <= 0 and causal_split:
                return write_kv_cache, paged_attention
            logger.info("attention kernels: decode partitions <= %s tokens, prefill causal split %s",
                        max_partition_tokens or "default", causal_split)
            decode_config = DecodeConfig(max_partition_tokens=max_partition_tokens or None)
            return write_kv_cache, functools.partial(paged_attention, decode_config=decode_config,
                                                     prefill_config=PrefillConfig(causal_split=causal_split))
    return write_kv_cache_ref, _paged_attention_ref


class Attention(nn.Module):
    """Attention of this step's tokens over their sequences' paged KV context.

    k_cache / v_cache [num_blocks, num_kv_heads, block_size, head_dim] are views handed out by the model
    runner (bind_kv_cache); they are empty until the cache is allocated. An fp8 cache also binds
    k_scale / v_scale [num_blocks, num_kv_heads, block_size] fp32, one scale per (token, head)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    @property
    def is_cache_bound(self) -> bool:
        return self.k_cache.numel() > 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_written: bool = False) -> torch.Tensor:
        """q [T, H, D]; k, v [T, H_kv, D] -> [T, H * D]. kv_written: the caller has already stored
        this step's k/v at attn_metadata.slot_mapping (the fused RoPE kernel does), so skip the write."""
        assert self.is_cache_bound, "KV cache not bound: call bind_kv_cache before forward"
        write_kv_cache, paged_attention = get_attention_ops(q.device.type)
        if not kv_written:
            write_kv_cache(k, v, self.k_cache, self.v_cache, attn_metadata.slot_mapping, self.k_scale,
                           self.v_scale)
        out = paged_attention(q, self.k_cache, self.v_cache, attn_metadata.block_tables,
                              attn_metadata.seq_lens, attn_metadata.query_start_loc, self.scale,
                              attn_metadata.max_query_len, attn_metadata.max_seq_len,
                              k_scale=self.k_scale, v_scale=self.v_scale, num_decodes=attn_metadata.num_decodes,
                              max_decode_seq_len=attn_metadata.max_decode_seq_len or None)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bind_kv_cache(model: nn.Module, kv_cache: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Hand each Attention layer its views of kv_cache
    [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim] (and, for an fp8 cache, of kv_scales
    [num_layers, 2, num_blocks, num_kv_heads, block_size] fp32)."""
    layers = attention_layers(model)
    assert kv_cache.shape[0] == len(layers), f"{kv_cache.shape[0]} cache layers for {len(layers)} layers"
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = kv_cache[i, 0], kv_cache[i, 1]
        if kv_scales is not None:
            layer.k_scale, layer.v_scale = kv_scales[i, 0], kv_scales[i, 1]


def release_kv_cache(model: nn.Module) -> None:
    """Drop every layer's cache views so the cache tensor can be freed."""
    for layer in attention_layers(model):
        layer.k_cache, layer.v_cache = torch.empty(0), torch.empty(0)
        layer.k_scale = layer.v_scale = None
