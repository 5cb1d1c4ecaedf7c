#!/usr/bin/env bash
# Every CUDA test and GPU benchmark of issue 9 in one go (under 5 minutes on one H200); see
# bench/gpu_check.py for what it measures. Exits 0 with "no CUDA: skipped" without a GPU.
# Uses .venv/bin/python when there is one, else python3 (e.g. a system PyTorch with the
# project's wheels on PYTHONPATH). JSON: $OUT/gpu_check.json (or $OUT if it names a file),
# else bench/results/gpu_check.json.
#   bench/gpu_check.sh [--quick] [--no-compile] [--no-tests]
set -u
cd "$(dirname "$0")/.." || exit 1
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
exec "$PY" bench/gpu_check.py "$@"
