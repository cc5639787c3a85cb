#!/usr/bin/env bash
# One prepared GPU check (about 2 minutes on an H100; 70 s with --steps 5 --share-seconds 10): minvis_r50 training images/s at 360p
# (fp32 / TF32 / AMP), teacher inference frames/s, peak GPU memory, and the student/teacher
# sharing ratio on one GPU. Needs torch with CUDA, scipy and pycocotools importable; run from
# the repository root: `bash bench/gpu.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. python3 bench/gpu.py "$@"
