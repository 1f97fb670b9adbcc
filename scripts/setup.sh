#!/usr/bin/env bash
# Set up a development environment in .venv: redis-server (for the tests), torch, the project + dev tools.
# TORCH_SPEC picks the torch build: the default is the CPU build; on a GPU box use e.g. TORCH_SPEC=torch.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server (the tests start their own servers)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" -e ".[dev]"
echo "setup: done ($(.venv/bin/python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'))"
