"""Accuracy benchmark on both demo families (full vs 1 frame vs Sparse-MinVIS vs svis-ray); see
svis_ray/benchmark.py. Exits non-zero when a goal of issue 30 is missed on either family.

    python bench/accuracy.py [--out bench_out] [--families shapes,creatures] [--seeds 0,1,2]
                             [--recipes ...] [--reuse OLD/accuracy_{family}.json] [key=value ...]

Each family's runs go to OUT/<family>/ (accuracy.json, accuracy.png); ``{family}`` in any argument
(e.g. ``--reuse``) is replaced by the family's name. A family's goals: ``svis-ray benchmark --help``.
"""
import argparse
import sys

from svis_ray.cli import main


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--families", default="shapes,creatures")
    known, rest = p.parse_known_args(argv)
    failed = []
    for family in [f for f in known.families.split(",") if f]:
        args = [a.replace("{family}", family) for a in rest]
        if main(["benchmark", "--family", family, "--out", f"{known.out}/{family}", *args]) != 0:
            failed.append(family)
    if failed:
        print(f"bench/accuracy.py: goals missed (or the run failed) on: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
