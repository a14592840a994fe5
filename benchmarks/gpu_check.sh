#!/usr/bin/env bash
# The GPU check on a bare CUDA machine with torch/transformers/accelerate/peft (no network).
# Prepare here once:  pip download --no-deps -d .gpu_wheels datasets dill multiprocess vaderSentiment gguf
# (.gpu_wheels is ignored by git; carry it). Then on the GPU machine, from the repository root:
#   bash benchmarks/gpu_check.sh "$OUT"
set -euo pipefail
OUT="${1:-gpu_check_out}"
if [ -d .gpu_wheels ]; then
  python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout 480 python3 benchmarks/gpu_check.py --out "$OUT"
