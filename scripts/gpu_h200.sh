#!/usr/bin/env bash
# Issue 13 on one H200, in ONE device call (~9 minutes): kernel checks, both workloads on the Qwen3-0.6B
# shape (auto and fp8 KV, the two A/B switches), the fp8 quality figures, start-up cold and warm, and the
# Llama-3.2-1B shape; JSON and logs under $OUT, a short table last (bench/summarize.py).
#
#   bash scripts/gpu_h200.sh                       # everything, within BUDGET_S seconds (default 540)
#   STEPS="bench heavy" bash scripts/gpu_h200.sh   # a subset of: check bench heavy sampled constrained
#                                                  #   timeline quality kernels startup llama
#
# Carry [".whl", ".debs"] (built as scripts/gpu_serving.sh says) to time start-up through `python -m
# worker` with a Redis; without them bench/startup.py times the bare engine. Each step gets what is
# left of the budget (timeout) and is skipped when less than its estimate remains, in priority order.
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-540}
STEPS=${STEPS:-"check bench heavy sampled constrained timeline quality kernels startup llama"}
start=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if ls .whl/*.whl >/dev/null 2>&1; then
  mkdir -p /tmp/pylib /tmp/rs
  pip install -q --no-deps --target /tmp/pylib .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/pylib
  for deb in .debs/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" /tmp/rs; done
  export LD_LIBRARY_PATH=/tmp/rs/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PATH=/tmp/rs/usr/bin:$PATH
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$out/device.txt"
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$out/device.txt"

# step NAME ESTIMATE_S COMMAND...: run when STEPS names it (the part of NAME before any "-") and
# ESTIMATE_S still fits; stopped at the budget; its output in $out/NAME.log.
step() {
  local name=$1 estimate=$2; shift 2
  [[ " $STEPS " == *" ${name%%-*} "* ]] || return 0
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < estimate )); then echo "== $name: skipped ($left s left, needs ~$estimate s)"; return 0; fi
  echo "== $name (~$estimate s, $left s left)"
  local t0=$(date +%s)
  timeout "$left" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 )) s; tail of $out/$name.log:"; tail -n 4 "$out/$name.log" | sed 's/^/   /'
}

bench_args="--baselines 0 --repeats 3"
# 1. The new kernel paths on the GPU (fp8 with bf16/fp16 queries, causal split, split cap) vs the reference.
step check 45 $PY -m pytest tests/kernels -q -x -n 8 --confcutdir=tests/kernels -p no:cacheprovider \
  -k "fp8 or causal_split or balanced or (gpu_prefill_sweep and bf16) or split_between or sampl or rope_kv"
# 2. Benchmark workload: auto, A/B switch A (split-K balancing), fp8; the workload JSON for vLLM.
step bench 130 $PY -m bench.throughput --workload benchmark $bench_args \
  --configs auto,auto:split=512,fp8 --json "$out/throughput-qwen3-benchmark.json" \
  --write-workload-json "$out/workload-benchmark.json"
# 3. Prefill-heavy workload: auto (causal split on, the default), switch B off (causal=0), fp8.
step heavy 105 $PY -m bench.throughput --workload prefill-heavy $bench_args \
  --configs auto,auto:causal=0,fp8 --json "$out/throughput-qwen3-prefill-heavy.json" \
  --write-workload-json "$out/workload-prefill-heavy.json"
# 3b. The predictions of BENCHMARKS.md "Landed after the GPU runs": temperature sampling through the fused
#     kernel, constrained requests launched ahead, and the per-step floors of a whole run.
step sampled 60 $PY -m bench.throughput --workload benchmark --baselines 0 --temperature 1.0 \
  --json "$out/throughput-qwen3-temperature1.json"
step constrained-10 60 $PY -m bench.throughput --workload benchmark --baselines 0 --constrained-fraction 0.1 \
  --json "$out/throughput-qwen3-constrained10.json"
step constrained-100 60 $PY -m bench.throughput --workload benchmark --baselines 0 --constrained-fraction 1 \
  --json "$out/throughput-qwen3-constrained100.json"
step timeline 50 $PY -m bench.timeline --workload benchmark
# 4. fp8 quality on the benchmark shape (64 of the workload's prompts, 64 greedy tokens each), and on a
#    trained model (the synthetic language: peaked distributions like a real checkpoint's).
step quality-shape 40 $PY -m bench.kv_quality --json "$out/kv-quality-qwen3-0.6b.json"
step quality-synthetic 40 $PY -m bench.kv_quality --synthetic --json "$out/kv-quality-synthetic.json"
# 5. Decode / prefill kernels alone: fp8 and split-cap rows on the workload shapes, prefill variants.
step kernels 50 $PY -m bench.kernels --quick
# 6. Start-up to the first job served, cold (empty Triton cache) then warm.
step startup 70 $PY -m bench.startup --json "$out/startup.json"
# 7. The Llama-3.2-1B shape on both workloads (auto, one run each).
step llama-benchmark 40 $PY -m bench.throughput --model llama-3.2-1b --workload benchmark --baselines 0 \
  --json "$out/throughput-llama-benchmark.json"
step llama-heavy 35 $PY -m bench.throughput --model llama-3.2-1b --workload prefill-heavy --baselines 0 \
  --json "$out/throughput-llama-prefill-heavy.json"

echo "== summary ($(( $(date +%s) - start )) s)"
$PY -m bench.summarize "$out"
