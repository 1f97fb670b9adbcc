"""The paged-attention entry point of the GPU path: validates once and dispatches a batch to the
decode kernel (every query length <= 1) or to the prefill/extend kernel (anything longer)."""

from __future__ import annotations

import torch

from kernels.decode_attention import DecodeConfig, decode_attention
from kernels.prefill_attention import PrefillConfig, prefill_attention


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]; each sequence's tokens are its last ones
    k_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int
    seq_lens: torch.Tensor,  # [num_seqs] int: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int: cu_seqlens_q
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    k_scale: torch.Tensor | None = None,  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,
    decode_config: DecodeConfig | None = None,  # the decode kernel's tiles and split policy
    prefill_config: PrefillConfig | None = None,  # the prefill kernel's tiles and causal loop
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Same semantics as kernels.reference.paged_attention_ref: causal attention of each sequence's
    new tokens over its whole cached context, whose K/V (this step's included) are already written.

    max_query_len and max_seq_len are host-side upper bounds (no device sync here): they pick the
    kernel and size the grid. Under CUDA graphs pass the bounds the graph was captured with."""
    if max_query_len <= 1:
        return decode_attention(
            query=query,
            k_cache=k_cache,
            v_cache=v_cache,
            block_tables=block_tables,
            seq_lens=seq_lens,
            query_start_loc=query_start_loc,
            scale=scale,
            max_seq_len=max_seq_len,
            out=out,
            config=decode_config,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    return prefill_attention(
        query=query,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
        scale=scale,
        max_query_len=max_query_len,
        out=out,
        config=prefill_config,
        k_scale=k_scale,
        v_scale=v_scale,
    )
