"""The paged-attention entry point of the GPU path: validates once and dispatches a batch to the
decode kernel (every query length <= 1), to the prefill/extend kernel, or, for a mixed batch whose
leading sequences decode, each part to its own kernel."""

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
    num_decodes: int = 0,  # leading sequences with one query token each (mixed batches)
    max_decode_seq_len: int | None = None,  # host bound of those sequences' lengths (default max_seq_len)
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Same semantics as kernels.reference.paged_attention_ref: causal attention of each sequence's
    new tokens over its whole cached context, whose K/V (this step's included) are already written.

    max_query_len and max_seq_len are host-side upper bounds (no device sync here): they pick the
    kernel and size the grid. Under CUDA graphs pass the bounds the graph was captured with.

    In a mixed batch (chunked prefill beside decodes) the prefill kernel would give every decode row a
    whole row of query-tile programs, nearly all of them empty: with 256 sequences and chunks of up
    to 4,096 tokens that is ~250k programs a layer. The first num_decodes sequences go to the decode
    kernel instead (its split-K also balances their contexts), the rest to the prefill kernel."""
    num_seqs = seq_lens.shape[0]
    if max_query_len > 1 and 0 < num_decodes < num_seqs:
        if out is None:
            out = torch.empty_like(query)
        paged_attention(query, k_cache, v_cache, block_tables[:num_decodes], seq_lens[:num_decodes],
                        query_start_loc[:num_decodes + 1], scale, 1, max_decode_seq_len or max_seq_len,
                        out=out, k_scale=k_scale, v_scale=v_scale, decode_config=decode_config)
        # query_start_loc holds absolute token offsets: the prefill part reads and writes its own rows.
        return prefill_attention(query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                                 seq_lens=seq_lens, query_start_loc=query_start_loc, scale=scale,
                                 max_query_len=max_query_len, out=out, config=prefill_config, k_scale=k_scale,
                                 v_scale=v_scale, seq_offset=num_decodes)
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
