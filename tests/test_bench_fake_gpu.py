"""bench/fake_gpu.py, the CPU stand-in for a GPU step used by `bench.serving --fake-gpu`: every request
gets exactly its tokens (through chunked prefill and preemption) and each step sleeps as configured.
Runs in a subprocess: the patch replaces ModelRunner.execute_model for the whole process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.worker.conftest import REPO_ROOT

SCRIPT = """
import json, os, sys, time
os.environ["TOKENRELAY_BENCH_FAKE_GPU"] = "2,100"
import bench.fake_gpu  # noqa: F401  (installs the patch)
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
engine = LLMEngine(EngineConfig(model=sys.argv[1], num_kv_blocks=9, max_num_seqs=4,
                                max_num_batched_tokens=32, max_model_len=128))
prompts = [[5 + i] * (10 + 7 * i) for i in range(6)]
params = [SamplingParams(max_tokens=20 + 3 * i, ignore_eos=True) for i in range(6)]
t0 = time.perf_counter()
outs = engine.generate(prompts, params)
print(json.dumps({"lens": [len(o.token_ids) for o in outs], "ids": sorted({t for o in outs for t in o.token_ids}),
                  "steps": engine.num_steps, "wall": time.perf_counter() - t0,
                  "preemptions": engine.stats().num_preemptions}))
"""


def test_fake_gpu_gives_every_request_its_tokens_and_sleeps_per_step(tiny_model_dirs: dict[str, Path]) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dirs["qwen3"])], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["lens"] == [20 + 3 * i for i in range(6)]
    assert got["preemptions"] > 0  # 8 usable blocks for 4 running requests: the fake went through recompute too
    assert min(got["ids"]) >= 2 and len(got["ids"]) > 10  # varied ids, never bos/eos
    # Each step sleeps 2 ms plus 0.1 ms per scheduled token: at least 2 ms a step.
    assert got["wall"] >= got["steps"] * 0.002
