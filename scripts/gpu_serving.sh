#!/usr/bin/env bash
# The H100 serving run (issue 6), for the `device` tool, whose image has torch/triton/transformers but no
# redis-py, pydantic-settings, prometheus-client, msgspec (the engine's pipe and outputs) or redis-server.
# Prepare the carry on this machine:
#   mkdir -p .whl .debs
#   (cd .whl && pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#      --platform any --no-deps redis pydantic pydantic-core pydantic-settings prometheus-client tqdm \
#      python-dotenv typing-inspection annotated-types typing-extensions msgspec)
#   (cd .debs && apt-get download redis-server redis-tools libjemalloc2 liblzf1 liblua5.1-0)
# then run with carry [".whl", ".debs"]:
#   bash scripts/gpu_serving.sh --load-fractions 0.5 --no-knob-sweeps --compare-engine-modes
# Arguments go to `python -m bench.serving`; the report lands in $OUT/serving.json.
set -euo pipefail
mkdir -p /tmp/pylib /tmp/rs
pip install -q --no-deps --target /tmp/pylib .whl/*.whl
for deb in .debs/*.deb; do dpkg -x "$deb" /tmp/rs; done
export LD_LIBRARY_PATH=/tmp/rs/usr/lib/x86_64-linux-gnu
export PATH=/tmp/rs/usr/bin:$PATH
export PYTHONPATH=$PWD:/tmp/pylib
out=${OUT:-bench/out}
redis-server --version
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
python -m bench.serving "$@" --json "$out/serving.json" 2>"$out/serving.stderr" | tail -30
grep -v "it/s\]" "$out/serving.stderr" | tail -5 || true
cp bench/results/serving-*cuda*.png "$out/" 2>/dev/null || true
