"""bench/kv_quality.py's metrics on the CPU: two identical caches compare as identical (KL 0, full
agreement), the teacher-forced pass reproduces greedy decoding, and the fp8 cache shows a small,
non-zero divergence."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.kv_quality import compare, make_engine
from bench.workload import make_workload


def test_kv_quality_metrics(tiny_model_dir: Path) -> None:
    args = argparse.Namespace(device="cpu", num_prompts=4, max_num_batched_tokens=64, max_model_len=128)
    prompts = make_workload(4, 5, 40, max_token_id=300).prompts
    same = compare(make_engine(tiny_model_dir, args, "auto", 64), make_engine(tiny_model_dir, args, "auto", 64),
                   prompts, max_tokens=8)
    assert same["mean_kl"] == 0.0 and same["next_token_agreement"] == 1.0 and same["greedy_identical"] == 1.0
    assert same["auto_self_agreement"] == 1.0 and same["num_positions"] == 4 * 8
    fp8 = compare(make_engine(tiny_model_dir, args, "auto", 64), make_engine(tiny_model_dir, args, "fp8", 64),
                  prompts, max_tokens=8)
    assert fp8["auto_self_agreement"] == 1.0
    assert 0.0 < fp8["mean_kl"] <= fp8["max_kl"] < 0.1
