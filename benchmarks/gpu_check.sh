#!/usr/bin/env bash
# The GPU check on a bare CUDA machine with torch/transformers/accelerate/peft (no network).
# Prepare here once:  pip download --no-deps -d .gpu_wheels datasets dill multiprocess vaderSentiment gguf
# (.gpu_wheels is ignored by git; carry it). Then on the GPU machine, from the repository root:
#   bash benchmarks/gpu_check.sh "$OUT" [extra gpu_check.py arguments, e.g. --parts head_memory_7b,host_syncs]
# Time: the device gives at most 10 minutes per command. The script runs its parts under a 470 s budget
# (each part also under its own cap, see PARTS in gpu_check.py; expected total on one H200 ~7.8 minutes, not yet
# measured, with the checks of the precision/sharding fixes run early: tf32_ratio, bf16_step0_margins, zero3_skip
# (skipped without DeepSpeed), fsdp2_efficient_loading (skipped under 2 GPUs); a part the budget cuts records so, the
# last ones first: rerun them with --parts) and rewrites $OUT/gpu_check.json after every part; `timeout` below is
# the backstop (install ~0.5 min + 540 s).
set -euo pipefail
OUT="${1:-gpu_check_out}"
shift || true
if [ -d .gpu_wheels ]; then
  python3 -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
fi
python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout -k 10 540 python3 benchmarks/gpu_check.py --out "$OUT" --budget 470 "$@"
