"""Training entry point for `ray job submit` (same as `svis-ray train`).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --config configs/ytvis19_r50_1frame.yaml data.root=/data/ytvis19

With RAY_ADDRESS set (as `ray job submit` does) it joins that cluster; otherwise it starts a
local Ray (debug mode).
"""
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this from the repo root; make the package importable
# there even when the cluster image has not pip-installed it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svis_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
