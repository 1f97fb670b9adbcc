#!/usr/bin/env bash
# Issue 17 (tensor parallelism) on 2 or 4 H200s, in ONE device call: a smoke run at TP=N, the Qwen3-0.6B
# benchmark at TP=1 and TP=2 (what the all-reduces cost a small model), and the Llama-3-70B shape on
# random weights (load_format=dummy: nothing written to disk) at TP=N. JSON and logs under $OUT.
#
#   bash scripts/gpu_tp.sh              # on nvidia-h200-x2: TP=2 (~8 minutes)
#   TP=4 bash scripts/gpu_tp.sh         # on nvidia-h200-x4: TP=4 (the Qwen3 pair still at TP=1 and 2)
#   EAGER=1 bash scripts/gpu_tp.sh      # without decode CUDA graphs (if capturing NCCL all-reduces fails)
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
PY=${PY:-python3}
TP=${TP:-2}
BUDGET_S=${BUDGET_S:-560}
start=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
eager=${EAGER:+--enforce-eager}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
nvidia-smi topo -m >> "$out/device.txt" 2>&1

step() {  # step NAME ESTIMATE_S COMMAND...: run while the budget allows; output in $out/NAME.log
  local name=$1 estimate=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < estimate )); then echo "== $name: skipped ($left s left, needs ~$estimate s)"; return 0; fi
  echo "== $name (~$estimate s, $left s left)"
  timeout "$left" "$@" > "$out/$name.log" 2>&1
  echo "   rc=$?; tail of $out/$name.log:"; tail -n 4 "$out/$name.log" | sed 's/^/   /'
}

args="--baselines 0 $eager"
step smoke 60 $PY -m bench.throughput --quick --tensor-parallel-size "$TP" $args --json "$out/tp$TP-smoke.json"
step qwen-tp1 90 $PY -m bench.throughput --model qwen3-0.6b $args --repeats 2 --json "$out/tp1-qwen3.json"
step qwen-tp2 100 $PY -m bench.throughput --model qwen3-0.6b --tensor-parallel-size 2 $args --repeats 2 \
  --json "$out/tp2-qwen3.json"
step llama70b 240 $PY -m bench.throughput --model llama-3-70b --load-format dummy --tensor-parallel-size "$TP" \
  $args --json "$out/tp$TP-llama-3-70b.json"
