#!/usr/bin/env bash
# The fine-grained DAS comparison at paper scale on one GPU (issue 11): full fine-tune of
# EfficientNet-Lite0 on emoji-styles, baseline vs DAS and the hypothesis variants, as parallel
# processes within FINEGRAINED_BUDGET_S seconds (default 300). Prints JSON records; writes them
# to $OUT/gpu_finegrained.json when $OUT is set. Without CUDA: "no CUDA: skipped", exit 0.
#   bench/gpu_finegrained.sh DATA.npz [extra options of bench/gpu_finegrained.py]
# DATA.npz: `python bench/gpu_finegrained.py --export DATA.npz` (or data/emoji-styles/emoji-styles-64.npz).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_finegrained.py --data "${1:?usage: bench/gpu_finegrained.sh DATA.npz [options]}" \
  --budget-s "${FINEGRAINED_BUDGET_S:-300}" "${@:2}"
