"""Triton kernels for the paged KV cache and their plain-torch references.

Imports nothing from engine/, worker/ or redis: the GPU image runs this bare."""

from kernels.decode_attention import DecodeConfig, decode_attention
from kernels.kv_cache import write_kv_cache
from kernels.paged_attention import paged_attention
from kernels.prefill_attention import PrefillConfig, prefill_attention
from kernels.reference import PAD_SLOT_ID, paged_attention_ref, write_kv_cache_ref

__all__ = [
    "PAD_SLOT_ID",
    "DecodeConfig",
    "PrefillConfig",
    "decode_attention",
    "paged_attention",
    "paged_attention_ref",
    "prefill_attention",
    "write_kv_cache",
    "write_kv_cache_ref",
]
