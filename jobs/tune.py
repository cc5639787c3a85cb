"""Sweep entry point for `ray job submit` (same as `svis-ray tune`).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py --config configs/tune_ytvis19_r50.yaml data.root=/mnt/shared/ytvis19

With RAY_ADDRESS set (as `ray job submit` does) it joins that cluster; otherwise it starts a
local Ray. Running it again with the same sweep name resumes an interrupted sweep.
"""
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this from the repo root; make the package importable
# there even when the cluster image has not pip-installed it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svis_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
