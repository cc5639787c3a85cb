"""The annotation-budget curve (issue 28): held-out AP against labelled frames per video.

    python bench/budget.py [--out bench_budget] [--seeds 0,1,2] [--budget 1,2,4,all]
                           [--recipes labelled_only,svis_ray] [--selections middle,uniform,suggested]
                           [--two-round] [--family shapes|creatures] [key=value ...]

For every seed, recipe (``svis_ray.benchmark.RECIPES``: ``labelled_only``, ``svis_ray``), budget K
and selection of the K frames -- ``middle``/``uniform`` (``svis-ray sparsify --strategy``) or
``suggested`` (``svis-ray suggest-frames``, model-free, then ``sparsify --frames-from``) -- one
training run on the debug config with the benchmark's recipe keys, same seeds and step budget,
evaluated on the family's held-out videos. K = ``all`` is every frame labelled: the ``full``
recipe, one run per seed shared by both curves. ``--two-round``: round 1 is ``svis_ray`` on the
1 suggested frame per video; its checkpoint suggests one more frame per video
(``suggest-frames --checkpoint --labelled``) and round 2 trains ``svis_ray`` afresh on both
frames -- compared with ``svis_ray`` on 2 ``uniform`` frames, the same budget spent by rule.

Writes OUT/budget.json (``{"runs": {"recipe/selection/K": {"seeds": {seed: metrics}, "mean",
"std", "config"}}, "command": ...}``, after every run) and OUT/budget.png (AP against K, one
line per recipe x selection, +- 1 std over seeds), prints the table, the goal checks of issue 28
(``goals``) and the command that reproduces it, and exits 1 when a measured goal is missed.
A run already in OUT/budget.json with the same config and data is not retrained (a stopped run
resumes). Data and suggestions stay in OUT/data/.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from svis_ray.benchmark import KEYS, RECIPES, comparable, data_fingerprint, parse_seeds  # noqa: E402
from svis_ray.errors import SvisError  # noqa: E402

BUDGET_RECIPES = ("labelled_only", "svis_ray")
SELECTIONS = ("middle", "uniform", "suggested")
ALL = "all"
# Goals of issue 28 (AP as fractions, mean over seeds)
SUGGESTED_GAIN = 0.01  # svis_ray, 1 suggested frame >= 1 middle frame + 1 AP
TWO_ROUND_GAIN = 0.01  # two rounds >= the same budget by uniform + 1 AP
MIN_SEEDS = 3


def parse_budget(text: str) -> list[int | str]:
    """``"1,2,4,all"`` -> ``[1, 2, 4, "all"]``; SvisError for anything but positive integers and ``all``."""
    out: list[int | str] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item == ALL:
            out.append(ALL)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise SvisError(f"--budget: expected positive integers and 'all', e.g. 1,2,4,all, got {item!r}")
    if not out:
        raise SvisError("--budget: empty list")
    return sorted(set(out), key=lambda k: (k == ALL, k if k != ALL else 0))


def run_name(recipe: str, selection: str, k: int | str) -> str:
    return f"{recipe}/{selection}/{k}"


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    """Mean and standard deviation over the seeds of every run."""
    for r in runs.values():
        if r["seeds"]:
            table = np.array([[m[k] for k in KEYS] for m in r["seeds"].values()])
            r["mean"], r["std"] = dict(zip(KEYS, table.mean(0).tolist())), dict(zip(KEYS, table.std(0).tolist()))
    return runs


def _ap(runs: dict[str, dict], name: str) -> float | None:
    r = runs.get(name)
    return r["mean"]["AP"] if r and "mean" in r else None


def goals(runs: dict[str, dict]) -> dict[str, bool | None]:
    """Issue 28's goals on the measured runs: True/False, or None where a run it needs is missing."""
    out: dict[str, bool | None] = {}
    sug, mid = _ap(runs, "svis_ray/suggested/1"), _ap(runs, "svis_ray/middle/1")
    out[f"svis_ray, 1 suggested frame >= 1 middle frame + {100 * SUGGESTED_GAIN:g} AP"] = \
        None if sug is None or mid is None else sug >= mid + SUGGESTED_GAIN
    two, uni = _ap(runs, "svis_ray/two_round/2"), _ap(runs, "svis_ray/uniform/2")
    out[f"two rounds (1 rule + 1 model-suggested frame) >= 2 uniform frames + {100 * TWO_ROUND_GAIN:g} AP"] = \
        None if two is None or uni is None else two >= uni + TWO_ROUND_GAIN
    pairs = matches(runs)
    out["svis_ray at K frames matches labelled_only at 2K for some K"] = \
        None if not pairs else any(ok for _, _, ok in pairs)
    return out


def matches(runs: dict[str, dict]) -> list[tuple[str, str, bool]]:
    """(svis_ray run, labelled_only run at twice the frames, svis_ray >= it) for every pair measured
    with the same selection."""
    out = []
    for name in runs:
        recipe, selection, k = name.split("/")
        if recipe != "svis_ray" or not k.isdigit():
            continue
        other = run_name("labelled_only", selection, 2 * int(k))
        a, b = _ap(runs, name), _ap(runs, other)
        if a is not None and b is not None:
            out.append((name, other, a >= b))
    return out


def check(runs: dict[str, dict]) -> int:
    """Print the goal checks; 1 if a measured goal is missed, else 0."""
    seeds = min((len(r["seeds"]) for r in runs.values() if r["seeds"]), default=0)
    if seeds < MIN_SEEDS:
        print(f"note: {seeds} seed(s) per run; issue 28's goals ask for the mean over >= {MIN_SEEDS}")
    for a, b, ok in matches(runs):
        print(f"  {a} {100 * _ap(runs, a):.1f} AP {'>=' if ok else '<'} {b} {100 * _ap(runs, b):.1f} AP")
    missed = False
    for text, ok in goals(runs).items():
        print(f"{'NOT MEASURED' if ok is None else 'PASS' if ok else 'FAIL'}: {text}")
        missed |= ok is False
    return 1 if missed else 0


# ----------------------------------------------------------------------------- plot
def plot(runs: dict[str, dict], budget: list[int | str], out: Path, title: str) -> None:
    """AP against labelled frames per video: a line per recipe x selection (mean, +- 1 std bars)."""
    from svis_ray.pictures import colour, write_png

    W, H, left, right, top, bottom = 640, 360, 60, 190, 30, 310
    img = np.full((H, W, 3), 255, np.uint8)
    measured = [r for r in runs.values() if "mean" in r]
    peak = max((100 * (r["mean"]["AP"] + r["std"]["AP"]) for r in measured), default=10.0)
    limit = max(10.0, 5 * np.ceil(1.1 * peak / 5))
    xs = {k: left + int((W - left - right) * (i + 0.5) / len(budget)) for i, k in enumerate(budget)}

    def y(ap: float) -> int:
        return int(round(bottom - (bottom - top) * max(0.0, ap) / limit))

    font = cv2.FONT_HERSHEY_SIMPLEX
    for tick in np.arange(0, limit + 1e-9, 5):
        cv2.line(img, (left - 10, y(tick)), (W - right, y(tick)), (225, 225, 225), 1)
        cv2.putText(img, f"{tick:g}", (left - 40, y(tick) + 4), font, 0.35, (90, 90, 90), 1, cv2.LINE_AA)
    for k, x in xs.items():
        cv2.putText(img, str(k), (x - 8, bottom + 18), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "labelled frames per video", (left + 80, bottom + 40), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    lines: dict[str, list[tuple[int, float, float]]] = {}
    for name, r in runs.items():
        recipe, selection, k = name.split("/")
        key = int(k) if k.isdigit() else k
        if "mean" not in r or key not in xs or recipe == "full":
            continue
        lines.setdefault(f"{recipe}/{selection}", []).append((xs[key], 100 * r["mean"]["AP"], 100 * r["std"]["AP"]))
    full = runs.get(run_name("full", ALL, ALL), {})
    if "mean" in full and ALL in xs:  # every frame labelled: each line's end point
        for pts in lines.values():
            pts.append((xs[ALL], 100 * full["mean"]["AP"], 100 * full["std"]["AP"]))
        lines.setdefault("full", [(xs[ALL], 100 * full["mean"]["AP"], 100 * full["std"]["AP"])])
    for i, (label, pts) in enumerate(sorted(lines.items())):
        ink = colour(i)
        pts.sort()
        for (x0, a0, _), (x1, a1, _) in zip(pts, pts[1:]):
            cv2.line(img, (x0, y(a0)), (x1, y(a1)), ink, 2, cv2.LINE_AA)
        for x, a, s in pts:
            dx = 3 * (i - len(lines) // 2)  # bars side by side, so equal points stay readable
            cv2.line(img, (x + dx, y(a - s)), (x + dx, y(a + s)), ink, 1)
            cv2.circle(img, (x, y(a)), 4, ink, -1)
        cv2.line(img, (W - right + 15, top + 18 * i), (W - right + 35, top + 18 * i), ink, 2)
        cv2.putText(img, label, (W - right + 40, top + 18 * i + 4), font, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    seeds = max((len(r["seeds"]) for r in runs.values()), default=0)
    cv2.putText(img, f"held-out mask AP ({title}), mean +- 1 std over {seeds} seed(s)", (10, 18), font, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    write_png(out, img)


# ----------------------------------------------------------------------------- runs
def labelled_file(data: Path, selection: str, k: int | str, log) -> str:
    """The training JSON (relative to ``data``) labelling ``k`` frames per video by ``selection``."""
    from svis_ray.data.sparsify import sparsify
    from svis_ray.suggest import load_frames, suggest_frames

    if k == ALL:
        return "train.json"
    name = f"train_{selection}_{k}.json"
    if not (data / name).exists():
        if selection == "suggested":
            suggest_frames(data / "train.json", str(data), int(k), data / f"suggested_{k}.json", log=log)
            sparsify(data / "train.json", data / name, frames=load_frames(data / f"suggested_{k}.json"),
                     frames_source=str(data / f"suggested_{k}.json"))
        else:
            sparsify(data / "train.json", data / name, frames_per_video=int(k), strategy=selection)
    return name


def config_for(recipe: str, data: Path, train_json: str, seed: int, overrides: list[str], out_dir: Path, tag: str):
    """The benchmark's recipe on ``train_json``; the recipe's own keys win, as in ``svis-ray benchmark``."""
    from svis_ray.config import load_config
    from svis_ray.demo_job import DEBUG_CONFIG

    return load_config(DEBUG_CONFIG, [f"data.root={data}", f"train.seed={seed}", *overrides,
                                      f"data.train_json={train_json}", *RECIPES[recipe],
                                      f"output.dir={out_dir}/runs/{tag}_seed{seed}"])


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench/budget.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python bench/budget.py --out /tmp/budget --seeds 0 --budget 1 "
                                       "--recipes svis_ray --selections middle,suggested")
    p.add_argument("--out", default="bench_budget")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", default="1,2,4,all", help="labelled frames per video, e.g. 1,2,4,all")
    p.add_argument("--recipes", default=",".join(BUDGET_RECIPES))
    p.add_argument("--selections", default=",".join(SELECTIONS))
    p.add_argument("--two-round", action="store_true", help="also round 1 -> model suggestions -> round 2")
    p.add_argument("--family", default="shapes", choices=("shapes", "creatures"))
    p.add_argument("--coverage-only", action="store_true",
                   help="no training: print what each selection labels (masks per video, share of instances)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    command = "python bench/budget.py " + shlex.join(argv)
    try:
        return _run(a, command)
    except SvisError as e:
        print(f"bench/budget.py: error: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace, command: str) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from svis_ray.benchmark import BenchData, make_benchmark_data, size_overrides
    from svis_ray.io import read_json, write_json

    seeds, budget = parse_seeds(a.seeds), parse_budget(a.budget)
    recipes = [r for r in a.recipes.split(",") if r]
    selections = [s for s in a.selections.split(",") if s]
    for bad, allowed, flag in ((set(recipes) - set(BUDGET_RECIPES), BUDGET_RECIPES, "--recipes"),
                               (set(selections) - set(SELECTIONS), SELECTIONS, "--selections")):
        if bad:
            raise SvisError(f"{flag}: unknown {sorted(bad)}; choose from {', '.join(allowed)}")
    out = Path(a.out)
    data = out / "data"
    if not (data / "train.json").exists():
        make_benchmark_data(str(data), a.family)
    overrides = [*size_overrides(BenchData(family=a.family), data), *a.overrides]
    if a.coverage_only:
        return coverage(data, [k for k in budget if k != ALL], selections, log=lambda s: None)
    fingerprint = data_fingerprint(str(data))
    prev = read_json(out / "budget.json")["runs"] if (out / "budget.json").exists() else {}
    runs: dict[str, dict] = {}

    def log(text: str) -> None:
        print(text, flush=True)

    def train(name: str, recipe: str, train_json: str, seed: int) -> dict[str, Any]:
        """Train one run (or take it from an earlier budget.json if trained the same way)."""
        from svis_ray.train import run_training

        tag = name.replace("/", "_")
        cfg = config_for(recipe, data, train_json, seed, overrides, out, tag)
        config = {**comparable(cfg), "data_sha256": fingerprint}
        entry = runs.setdefault(name, {"seeds": {}, "config": config, "checkpoints": {}})
        old = prev.get(name, {})
        if old.get("config") == config and str(seed) in old.get("seeds", {}):
            entry["seeds"][str(seed)] = old["seeds"][str(seed)]
            entry["checkpoints"][str(seed)] = old.get("checkpoints", {}).get(str(seed))
            log(f"{name} seed {seed}: AP {100 * entry['seeds'][str(seed)]['AP']:.1f} (from {out / 'budget.json'})")
            return entry
        summary = run_training(cfg)
        entry["seeds"][str(seed)] = {k: summary["metrics"][k] for k in KEYS}
        entry["checkpoints"][str(seed)] = str(summary["checkpoint"])
        log(f"{name} seed {seed}: AP {100 * summary['metrics']['AP']:.1f}")
        write_json(out / "budget.json", {"runs": summarize(runs), "command": command}, indent=1)
        return entry

    for seed in seeds:
        for k in budget:
            if k == ALL:
                train(run_name("full", ALL, ALL), "full", "train.json", seed)
                continue
            for recipe in recipes:
                for selection in selections:
                    train(run_name(recipe, selection, k), recipe, labelled_file(data, selection, k, log), seed)
        if a.two_round:
            first = train(run_name("svis_ray", "suggested", 1), "svis_ray", labelled_file(data, "suggested", 1, log),
                          seed)
            train(run_name("svis_ray", "uniform", 2), "svis_ray", labelled_file(data, "uniform", 2, log), seed)
            train(run_name("svis_ray", "two_round", 2), "svis_ray",
                  _second_round(data, first["checkpoints"][str(seed)], seed, log), seed)
    summarize(runs)
    write_json(out / "budget.json", {"runs": runs, "command": command}, indent=1)
    plot(runs, budget, out / "budget.png", f"{a.family} demo data")
    print(f"{'run':<28}" + "".join(f"{k:>14}" for k in KEYS))
    for name, r in runs.items():
        print(f"{name:<28}" + "".join(f"{100 * r['mean'][k]:>8.1f} ±{100 * r['std'][k]:4.1f}" for k in KEYS)
              + f"  ({len(r['seeds'])} seeds)")
    print(f"wrote {out / 'budget.json'} and {out / 'budget.png'}")
    status = check(runs)
    print(f"reproduce: {command}")
    return status


def coverage(data: Path, budget: list[int], selections: list[str], log) -> int:
    """Print, per K and selection, the ground-truth masks its frames label per training video and
    the share of instances labelled on at least one frame (no training)."""
    from svis_ray.data.sparsify import sparsify

    for k in budget:
        for selection in selections:
            name = labelled_file(data, selection, k, log)
            s = sparsify(data / "train.json", data / "coverage.json", frames=_frames_of(data / name))
            print(f"K={k} {selection:<10} masks labelled per video {s['masks_kept'] / s['videos']:.3f}, "
                  f"instances labelled {s['instances_kept'] / s['instances']:.3f}")
    (data / "coverage.json").unlink(missing_ok=True)
    return 0


def _frames_of(path: Path) -> dict[int, list[int]]:
    from svis_ray.io import read_json

    return {v["id"]: v["labelled_frames"] for v in read_json(path)["videos"]}


def _second_round(data: Path, checkpoint: str, seed: int, log) -> str:
    """Round 2's training JSON: round 1's suggested frame plus one frame per video suggested by
    round 1's checkpoint (per seed: each seed's round 1 is its own model)."""
    from svis_ray.data.sparsify import sparsify
    from svis_ray.suggest import load_frames, suggest_frames

    first = data / "suggested_1.json"
    more = data / f"two_round_seed{seed}.json"
    suggest_frames(data / "train.json", str(data), 1, more, checkpoint=checkpoint, labelled=first, log=log)
    extra = load_frames(more)
    frames = {vid: sorted(set(ts) | set(extra[vid])) for vid, ts in load_frames(first).items()}
    name = f"train_two_round_seed{seed}.json"
    sparsify(data / "train.json", data / name, frames=frames, frames_source=f"{first} + {more}")
    return name


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
