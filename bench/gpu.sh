#!/usr/bin/env bash
# One prepared GPU check (issue 26; about 8 minutes on an H100, compilation included, rows past
# --budget seconds are skipped): minvis_r50 training images/s, peak memory and fraction of the GPU's
# peak FLOP/s at 360x640 for fp32 / tf32 / bf16 x eager / torch.compile, the step's time split,
# host syncs per step, teacher frames/s (eager vs compiled bf16) and the student/teacher sharing
# ratio on one GPU. Needs torch with CUDA, scipy and pycocotools importable; run from the
# repository root: `bash bench/gpu.sh`. `bash bench/gpu.sh --cpu-smoke` runs the same rows for the
# tiny preset on the CPU in a minute or two (checks the script, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --cpu-smoke "* ]]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
PYTHONPATH=. python3 bench/gpu.py "$@"
