#!/usr/bin/env bash
# The README's first command: set up .venv (scripts/setup.sh), then start a worker on the embedded model
# (SmolLM2-135M-Instruct, no configuration), ask it one chat question through Redis, print the answer as
# it streams, and stop the worker. Any arguments go to `python -m worker.quickstart` (e.g. a question).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m worker.quickstart "$@"
