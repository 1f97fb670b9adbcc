"""paged_attention (decode and prefill/extend kernels) against paged_attention_ref on random caches
with shuffled block tables, partly filled last blocks, GQA, split-K decode, mixed query lengths, and
fp8 caches with per-token scales."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

from kernels import (
    DecodeConfig,
    PrefillConfig,
    decode_attention,
    paged_attention,
    paged_attention_ref,
    write_kv_cache,
    write_kv_cache_ref,
)
from kernels.decode_attention import choose_num_partitions
from kernels.reference import FP8_DTYPE

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
POISON = 30.0  # fills every slot no sequence owns: a kernel that reads one is far off the reference
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class Batch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, num_kv_heads, block_size, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    scale: float
    max_query_len: int
    max_seq_len: int
    k_scale: torch.Tensor | None = None  # [num_blocks, num_kv_heads, block_size] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None


def make_batch(
    device: torch.device,
    seq_lens: list[int],
    query_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    kv_dtype: torch.dtype | None = None,
    kv_magnitude: float = 1.0,
) -> Batch:
    """Random K/V (times kv_magnitude) written through the reference into blocks taken in shuffled
    order; block-table padding points at a poisoned spare block. kv_dtype: the cache's dtype when it
    differs from the query's (FP8_DTYPE: per-token scales beside it, poisoned where unwritten too)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    order = torch.randperm(num_blocks, generator=gen)
    poison_block = int(order[-1])
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    kv_dtype = kv_dtype or dtype
    k_cache = torch.full(shape, POISON, dtype=kv_dtype)
    v_cache = torch.full(shape, POISON, dtype=kv_dtype)
    k_scale = v_scale = None
    if kv_dtype == FP8_DTYPE:
        k_scale = torch.full(shape[:3], POISON, dtype=torch.float32)
        v_scale = torch.full(shape[:3], POISON, dtype=torch.float32)
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.full((len(seq_lens), max_blocks), poison_block, dtype=torch.int32)
    used = 0
    for i, (seq_len, n) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        table = order[used : used + n]
        used += n
        block_tables[i, :n] = table
        slots = (table[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:seq_len]
        key = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen) * kv_magnitude
        value = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen) * kv_magnitude
        write_kv_cache_ref(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    num_tokens = sum(query_lens)
    # A strided view, as the fused qkv projection produces it.
    qkv = torch.randn(num_tokens, num_kv_heads * group + 2 * num_kv_heads, head_dim, generator=gen)
    query = qkv[:, : num_kv_heads * group].to(dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return Batch(
        query=query.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc.to(device),
        scale=head_dim**-0.5,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        k_scale=None if k_scale is None else k_scale.to(device),
        v_scale=None if v_scale is None else v_scale.to(device),
    )


def reference(batch: Batch) -> torch.Tensor:
    is_fp8 = batch.k_cache.dtype == FP8_DTYPE
    return paged_attention_ref(
        batch.query.float(),
        batch.k_cache if is_fp8 else batch.k_cache.float(),
        batch.v_cache if is_fp8 else batch.v_cache.float(),
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        batch.scale,
        batch.k_scale,
        batch.v_scale,
    )


def run_kernel(batch: Batch, prefill_config: PrefillConfig | None = None, num_decodes: int = 0,
               **decode_kwargs: object) -> torch.Tensor:
    # NaN-poisoned output: a row the kernel forgets to write fails the comparison.
    out = torch.full(batch.query.shape, float("nan"), dtype=batch.query.dtype, device=batch.query.device)
    if decode_kwargs:
        return decode_attention(
            query=batch.query,
            k_cache=batch.k_cache,
            v_cache=batch.v_cache,
            block_tables=batch.block_tables,
            seq_lens=batch.seq_lens,
            query_start_loc=batch.query_start_loc,
            scale=batch.scale,
            max_seq_len=batch.max_seq_len,
            out=out,
            k_scale=batch.k_scale,
            v_scale=batch.v_scale,
            **decode_kwargs,  # type: ignore[arg-type]
        )
    return paged_attention(
        query=batch.query,
        k_cache=batch.k_cache,
        v_cache=batch.v_cache,
        block_tables=batch.block_tables,
        seq_lens=batch.seq_lens,
        query_start_loc=batch.query_start_loc,
        scale=batch.scale,
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
        out=out,
        k_scale=batch.k_scale,
        v_scale=batch.v_scale,
        prefill_config=prefill_config,
        num_decodes=num_decodes,
        # Decode rows of a mixed batch: partitions of 16 tokens, so the split-K reduction runs too.
        decode_config=DecodeConfig(block_n=16, min_partition_tokens=16) if num_decodes else None,
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out, ref = out.float().cpu(), ref.float().cpu()
    assert not out.isnan().any(), "the kernel left rows unwritten"
    rel = (out - ref).norm() / ref.norm()
    assert rel < REL_TOL[dtype], f"relative error {rel:.2e} over {REL_TOL[dtype]:.0e}"


@pytest.mark.parametrize(
    ("block_size", "head_dim", "group"), [(8, 32, 1), (16, 64, 2), (8, 64, 4), (16, 32, 4)]
)
def test_decode_matches_reference(device: torch.device, block_size: int, head_dim: int, group: int) -> None:
    # Contexts spanning many blocks, last blocks partly filled, one sequence of a single token.
    seq_lens = [150, 1, 33, 17]
    batch = make_batch(device, seq_lens, [1] * 4, 2, group, head_dim, block_size, torch.float32, seed=group)
    ref = reference(batch)
    assert_close(run_kernel(batch), ref, torch.float32)
    # Split-K: partitions of 16 tokens, merged by the reduction kernel.
    assert_close(run_kernel(batch, config=DecodeConfig(block_n=16), num_partitions=5), ref, torch.float32)


@pytest.mark.parametrize("use_dot", [True, False])
def test_decode_bf16_and_padded_rows(device: torch.device, use_dot: bool) -> None:
    # A CUDA-graph batch padded with empty sequences (no query token, seq_len 0) between real ones.
    batch = make_batch(device, [40, 0, 23], [1, 0, 1], 2, 2, 32, 16, torch.bfloat16, seed=5)
    config = DecodeConfig(block_n=16, use_dot=use_dot)
    out = run_kernel(batch, config=config, num_partitions=2)
    assert_close(out, reference(batch), torch.bfloat16)


@pytest.mark.parametrize(("block_size", "group"), [(8, 1), (16, 2), (16, 4)])
def test_prefill_mixed_batch_matches_reference(device: torch.device, block_size: int, group: int) -> None:
    # Decode row with context, a fresh prompt, a chunked-prefill / prefix-hit extend, an idle sequence.
    seq_lens = [29, 21, 45, 12]
    query_lens = [1, 21, 19, 0]
    batch = make_batch(
        device, seq_lens, query_lens, 2, group, 32, block_size, torch.float32, seed=block_size + group
    )
    assert batch.max_query_len > 1
    assert_close(run_kernel(batch), reference(batch), torch.float32)


@pytest.mark.parametrize("kv_dtype", [None, FP8_DTYPE])
def test_mixed_batch_split_between_decode_and_prefill_kernels(device: torch.device, kv_dtype: torch.dtype | None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Decodes first (as the scheduler orders a mixed batch), then an extend chunk, a fresh prompt and an
    # idle row: the first three rows go to the decode kernel (split into partitions of 16 tokens), the
    # rest to the prefill kernel, both writing into one output.
    seq_lens, query_lens = [150, 1, 40, 45, 21, 12], [1, 1, 1, 19, 21, 0]
    batch = make_batch(device, seq_lens, query_lens, 2, 2, 32, 8, torch.float32, seed=21, kv_dtype=kv_dtype)
    ref = reference(batch)
    whole = run_kernel(batch)
    # The module, not the function kernels re-exports under the same name.
    dispatch = sys.modules["kernels.paged_attention"]
    decoded: list[int] = []  # sequences per decode-kernel launch

    def counting_decode(**kwargs: object) -> torch.Tensor:
        decoded.append(kwargs["seq_lens"].shape[0])  # type: ignore[attr-defined]
        return decode_attention(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "decode_attention", counting_decode)
    for num_decodes in (1, 3):
        decoded.clear()
        split = run_kernel(batch, num_decodes=num_decodes)
        assert decoded == [num_decodes], "the leading decode rows went to the decode kernel"
        assert_close(split, ref, torch.float32)
        # The same numbers as one prefill launch, up to the kernels' summation order.
        assert torch.allclose(split.float().cpu(), whole.float().cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_dtype", [None, FP8_DTYPE])
def test_prefill_causal_split_matches_reference(device: torch.device, kv_dtype: torch.dtype | None) -> None:
    # Small tiles so the prompts span many query and key tiles: unmasked tiles before the diagonal,
    # masked ones across it, a context before the new tokens (extend), the heaviest tile launched first.
    seq_lens, query_lens = [70, 45, 1, 90], [70, 30, 1, 17]
    batch = make_batch(device, seq_lens, query_lens, 2, 2, 32, 8, torch.float32, seed=13, kv_dtype=kv_dtype)
    config = PrefillConfig(rows_per_tile=16, block_n=16, causal_split=True)
    ref = reference(batch)
    assert_close(run_kernel(batch, prefill_config=config), ref, torch.float32)
    plain = PrefillConfig(rows_per_tile=16, block_n=16, causal_split=False)  # every tile masked
    assert_close(run_kernel(batch, prefill_config=plain), ref, torch.float32)


def test_prefill_bf16_head_dim_64(device: torch.device) -> None:
    batch = make_batch(device, [37, 18], [37, 5], 1, 2, 64, 16, torch.bfloat16, seed=11)
    assert_close(run_kernel(batch), reference(batch), torch.bfloat16)


@pytest.mark.parametrize(("dtype", "group"), [(torch.float32, 2), (torch.bfloat16, 4)])
def test_fp8_decode_and_split_match_reference(device: torch.device, dtype: torch.dtype, group: int) -> None:
    # Magnitudes far past e4m3's 448: only the per-token scales keep them representable.
    batch = make_batch(device, [150, 1, 33, 70], [1] * 4, 2, group, 32, 16, dtype, seed=3,
                       kv_dtype=FP8_DTYPE, kv_magnitude=1000.0)
    ref = reference(batch)
    assert_close(run_kernel(batch), ref, dtype)
    # Split-K over fp8: one-partition sequences write directly, the rest through the reduction.
    assert_close(run_kernel(batch, config=DecodeConfig(block_n=16), num_partitions=4), ref, dtype)


def test_fp8_prefill_mixed_batch_matches_reference(device: torch.device) -> None:
    seq_lens, query_lens = [29, 21, 45, 12], [1, 21, 19, 0]
    batch = make_batch(device, seq_lens, query_lens, 2, 2, 32, 8, torch.float32, seed=9,
                       kv_dtype=FP8_DTYPE, kv_magnitude=0.01)
    assert batch.max_query_len > 1
    assert_close(run_kernel(batch), reference(batch), torch.float32)


def test_fp8_attention_stays_close_to_unquantized(device: torch.device) -> None:
    """The fp8 cache's attention output is within e4m3's rounding (3 mantissa bits: ~5% here) of the
    full-precision one on the same K/V: the quantization is right, not merely what the reference does."""
    lens = [90, 40]
    exact = make_batch(device, lens, [1, 1], 2, 2, 32, 16, torch.float32, seed=4)
    fp8 = make_batch(device, lens, [1, 1], 2, 2, 32, 16, torch.float32, seed=4, kv_dtype=FP8_DTYPE)
    out, want = run_kernel(fp8).cpu(), reference(exact).cpu()
    rel = ((out - want).norm() / want.norm()).item()
    assert 1e-3 < rel < 0.1, f"fp8 attention relative error {rel:.2e}"


def test_balanced_split_writes_every_row(device: torch.device) -> None:
    # A ragged batch under max_partition_tokens: short sequences take the direct path, long ones split.
    seq_lens = [300, 20, 129, 64, 1]
    batch = make_batch(device, seq_lens, [1] * 5, 2, 2, 32, 16, torch.float32, seed=6)
    config = DecodeConfig(block_n=16, max_partition_tokens=64)
    assert choose_num_partitions(5, 2, 300, 132, config) == 5
    assert_close(run_kernel(batch, config=config), reference(batch), torch.float32)


def test_partition_choice_fills_the_gpu() -> None:
    config = DecodeConfig()
    # One long sequence: split into many partitions; a large batch already fills 132 SMs.
    assert choose_num_partitions(1, 8, 8192, 132, config) > 8
    assert choose_num_partitions(256, 8, 2048, 132, config) == 1
    # Short contexts are never split below min_partition_tokens.
    assert choose_num_partitions(1, 1, 300, 132, config) == 2
    # The balancing cap splits a full batch too: 2048 tokens in partitions of at most 512.
    assert choose_num_partitions(256, 8, 2048, 132, DecodeConfig(max_partition_tokens=512)) == 4


def test_rejects_bad_arguments(device: torch.device) -> None:
    batch = make_batch(device, [20], [1], 2, 2, 32, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(
            batch.query.half(),
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.scale,
            1,
            20,
        )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_attention(
            batch.query[:, :3],
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.scale,
            1,
            20,
        )
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(
            batch.query,
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc[:1],
            batch.scale,
            1,
            20,
        )
    with pytest.raises(ValueError, match="contiguous along head_dim"):
        paged_attention(
            batch.query.transpose(1, 2).contiguous().transpose(1, 2),
            batch.k_cache,
            batch.v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.scale,
            1,
            20,
        )


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize(("group", "block_size"), [(1, 16), (2, 16), (4, 32), (8, 16)])
def test_gpu_decode_sweep(dtype: torch.dtype, head_dim: int, group: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(head_dim * group + block_size)
    seq_lens = torch.randint(1, 3000, (37,), generator=gen).tolist()
    batch = make_batch(
        torch.device("cuda"), seq_lens, [1] * 37, 4, group, head_dim, block_size, dtype, seed=group
    )
    ref = reference(batch)
    assert_close(run_kernel(batch), ref, dtype)
    if head_dim <= 128:  # the broadcast variant's [group, block_n, head_dim] product outgrows registers
        assert_close(run_kernel(batch, config=DecodeConfig(use_dot=False, block_n=32)), ref, dtype)
    assert_close(run_kernel(batch, num_partitions=7), ref, dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_gpu_prefill_sweep(dtype: torch.dtype, head_dim: int, group: int) -> None:
    gen = torch.Generator().manual_seed(head_dim + group)
    query_lens = [1, 1, 700, 1, 300, 64, 1, 129]
    seq_lens = [q + int(torch.randint(0, 900, (1,), generator=gen)) for q in query_lens]
    seq_lens[2] = query_lens[2]  # one fresh prompt with no prior context
    batch = make_batch(torch.device("cuda"), seq_lens, query_lens, 2, group, head_dim, 16, dtype, seed=group)
    ref = reference(batch)
    assert_close(run_kernel(batch), ref, dtype)
    for config in (PrefillConfig(causal_split=True), PrefillConfig(128, 64, 8, 2, causal_split=True)):
        assert_close(run_kernel(batch, prefill_config=config), ref, dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_fp8_sweep(dtype: torch.dtype, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    device = torch.device("cuda")
    seq_lens = torch.randint(1, 3000, (37,), generator=gen).tolist()
    batch = make_batch(device, seq_lens, [1] * 37, 4, 2, head_dim, 16, dtype, seed=2, kv_dtype=FP8_DTYPE,
                       kv_magnitude=20.0)
    ref = reference(batch)
    assert_close(run_kernel(batch), ref, dtype)
    assert_close(run_kernel(batch, config=DecodeConfig(max_partition_tokens=512)), ref, dtype)
    query_lens = [1, 700, 1, 300, 64, 129]
    seq_lens = [q + int(torch.randint(0, 900, (1,), generator=gen)) for q in query_lens]
    batch = make_batch(device, seq_lens, query_lens, 4, 2, head_dim, 16, dtype, seed=3, kv_dtype=FP8_DTYPE)
    assert_close(run_kernel(batch), reference(batch), dtype)


@pytest.mark.gpu
@requires_gpu
def test_gpu_offsets_past_int32() -> None:
    """Blocks whose element offset exceeds 2**31: the kernels must index the cache in 64 bits."""
    device = torch.device("cuda")
    block_size, head_dim = 16, 128
    num_blocks = 2**31 // (block_size * head_dim) + 64  # 4.3 GB per bf16 cache
    k_cache = torch.empty((num_blocks, 1, block_size, head_dim), dtype=torch.bfloat16, device=device)
    v_cache = torch.empty_like(k_cache)
    seq_len = 20 * block_size - 3
    table = torch.cat([torch.arange(num_blocks - 10, num_blocks), torch.arange(10)]).to(device)
    slots = (table[:, None] * block_size + torch.arange(block_size, device=device)).reshape(-1)[:seq_len]
    key = torch.randn(seq_len, 1, head_dim, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    query = torch.randn(1, 2, head_dim, device=device, dtype=torch.bfloat16)
    args = (
        table[None].int(),
        torch.tensor([seq_len], device=device, dtype=torch.int32),
        torch.tensor([0, 1], device=device, dtype=torch.int32),
        head_dim**-0.5,
    )
    out = paged_attention(query, k_cache, v_cache, *args, max_query_len=1, max_seq_len=seq_len)
    # Reference on a compact copy of just the used blocks.
    k_small, v_small = k_cache[table].float(), v_cache[table].float()
    small_table = torch.arange(20, device=device, dtype=torch.int32)[None]
    ref = paged_attention_ref(query.float(), k_small, v_small, small_table, *args[1:])
    assert_close(out, ref, torch.bfloat16)
