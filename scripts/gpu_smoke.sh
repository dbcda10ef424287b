#!/usr/bin/env bash
# The first check on a GPU machine: offline, one GPU, under 10 minutes (benchmarks/gpu_smoke.py
# says what it runs). Writes benchmarks/results/gpu_smoke.json and gpu_smoke.md.
#   scripts/gpu_smoke.sh             # on the GPU machine, from any folder
#   scripts/gpu_smoke.sh --dry-run   # anywhere: validates its pipeline variants, prints the plan, writes nothing
# The Python is $PYTHON, else the checkout's .venv, else python3 on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
# Offline: models are built from configs, the tokenizer and data ship in flexkd/assets.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# benchmarks/gpu_smoke.py keeps to its 10-minute budget and writes its report; this is the safety net.
exec timeout 700 "$PYTHON" -m benchmarks.gpu_smoke "$@"
