"""bench.timeline: each step lands in its class, its floor is the larger of bytes over bandwidth and
FLOPs over the matmul rate, and a tiny CPU run records one entry per scheduled step."""

from __future__ import annotations

import math

import pytest

from bench.timeline import StepRecord, bucket_name, summarize


def test_steps_are_classed_by_prefill_and_batch() -> None:
    assert bucket_name(StepRecord(tokens=300, seqs=50, prefill_tokens=251, context_tokens=900)) == \
        "mixed (prefill chunk)"
    assert bucket_name(StepRecord(tokens=200, seqs=200, prefill_tokens=0, context_tokens=1)) == "decode batch >= 192"
    assert bucket_name(StepRecord(tokens=100, seqs=100, prefill_tokens=0, context_tokens=1)) == "decode batch >= 64"
    assert bucket_name(StepRecord(tokens=3, seqs=3, prefill_tokens=0, context_tokens=1)) == "decode batch >= 1"


def test_floor_is_the_larger_of_bytes_and_flops() -> None:
    decode = StepRecord(tokens=10, seqs=10, prefill_tokens=0, context_tokens=1000, wall_s=2.0)
    mixed = StepRecord(tokens=5000, seqs=2, prefill_tokens=4999, context_tokens=6000, wall_s=4.0)
    rows = summarize([decode, mixed], kv_per_token=100, weight_bytes=1000, flops_per_token=10.0,
                     bandwidth=1000.0, matmul=10_000.0)
    by_name = {r["bucket"]: r for r in rows}
    # decode: bytes (1000 * 100 + 1000) / 1000 = 101 s beat FLOPs 10 * 10 / 10,000.
    assert by_name["decode batch >= 1"]["floor_s"] == pytest.approx(101.0)
    # mixed: FLOPs 5000 * 10 / 10,000 = 5 s lose to bytes (6000 * 100 + 1000) / 1000 = 601 s.
    assert by_name["mixed (prefill chunk)"]["floor_s"] == pytest.approx(601.0)
    rows = summarize([mixed], kv_per_token=0, weight_bytes=0, flops_per_token=10.0, bandwidth=1000.0, matmul=100.0)
    assert rows[0]["floor_s"] == pytest.approx(500.0)  # now the FLOPs bound
    # Kernels one after another: decode rows' KV bytes + GEMMs (bytes or FLOPs) + prefill attention FLOPs.
    mixed.decode_context_tokens, mixed.prefill_pairs = 2000, 300
    row = summarize([mixed], kv_per_token=100, weight_bytes=1000, flops_per_token=10.0, bandwidth=1000.0,
                    matmul=10_000.0, flops_per_pair=1000.0)[0]
    assert row["sum_floor_s"] == pytest.approx(2000 * 100 / 1000 + max(1.0, 5.0) + 300 * 1000 / 10_000)
    total = {r["bucket"]: r for r in summarize([decode, mixed], 100, 1000, 10.0, 1000.0, 10_000.0)}["all"]
    assert total["steps"] == 2 and total["wall_s"] == pytest.approx(6.0)
    assert total["lost_s"] == pytest.approx(6.0 - 702.0)


def test_cpu_run_records_every_step(tmp_path: object) -> None:
    from bench.timeline import run, warm_up
    from bench.workload import make_checkpoint, make_workload
    from engine import EngineConfig
    from engine.llm_engine import LLMEngine

    model_dir = make_checkpoint("tiny", tmp_path / "m", dtype="float32")  # type: ignore[operator]
    workload = make_workload(6, 8, 24, max_token_id=4000, output_range=(2, 6))
    engine = LLMEngine(EngineConfig(model=str(model_dir), device="cpu", max_num_seqs=8,
                                    max_num_batched_tokens=64, max_model_len=64))
    warm_up(engine, workload.prompts[:4])
    engine.scheduler.reset_prefix_cache()  # else the warm-up's prompts hit the cache and compute less
    records = run(engine, workload.prompts, workload.output_lens)
    engine.shutdown()
    # Every output token after the first comes from a decode or mixed step; prompts go through in chunks.
    # Each request computes its prompt and every output token but the last (never fed back).
    assert sum(r.tokens for r in records) == (workload.num_prompt_tokens + workload.num_output_tokens
                                              - len(workload.prompts))
    assert all(r.wall_s > 0 for r in records)
    assert any(r.prefill_tokens for r in records) and not math.isnan(records[0].wall_s)
    # A prompt computed from scratch has n (n + 1) / 2 causal pairs however it is chunked; a one-token
    # chunk (counted as a decode row) leaves out at most its own n.
    exact = sum(len(p) * (len(p) + 1) // 2 for p in workload.prompts)
    pairs = sum(r.prefill_pairs for r in records)
    assert exact - workload.num_prompt_tokens <= pairs <= exact
    assert all(r.decode_context_tokens <= r.context_tokens for r in records)
