"""Accuracy benchmark (full vs 1 frame vs Sparse-MinVIS vs svis-ray); see svis_ray/benchmark.py.

    python bench/accuracy.py [--out bench_out] [--seeds 0,1,2] [key=value ...]   (= svis-ray benchmark)
"""
import sys

from svis_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
