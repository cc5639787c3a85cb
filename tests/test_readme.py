"""The README is for users: short, and its commands work as written.

A fenced block right after a ``<!-- runnable -->`` line is run command by command on the demo
data (cheap commands only: no training); every other ``svis-ray`` command in the README must at
least parse, with its config and overrides resolving.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = "<!-- runnable -->"


def readme_commands() -> list[tuple[bool, str]]:
    """(runnable, command) for every ``svis-ray`` / ``python`` command line in a fenced block;
    backslash continuations joined, trailing ``# comments`` and shell redirections dropped."""
    out, runnable, fence, pending = [], False, False, ""
    for line in README.read_text().splitlines():
        if not fence and line.strip() == MARKER:
            runnable = True
        elif line.startswith("```"):
            fence = not fence
            runnable = runnable and fence
        elif fence:
            pending += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
            if line.endswith("\\"):
                continue
            words = shlex.split(pending, comments=True)
            shell = [i for i, w in enumerate(words) if w in (">", "|", "&&", "&", ";")]
            command = shlex.join(words[:shell[0]] if shell else words)  # the command, not its redirection
            pending = ""
            if command.startswith(("svis-ray ", "python ")):
                out.append((runnable, command))
    return out


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_marks_runnable_commands():
    runnable = [c for r, c in readme_commands() if r]
    assert any(c.startswith("svis-ray check-data") for c in runnable)
    assert any(c.startswith("svis-ray evaluate") for c in runnable)


@pytest.fixture
def workdir(demo_root, tmp_path):
    """A folder where the README's paths exist: ``ytvis19`` is a copy of the demo data, ``configs``
    the repository's, and ``runs/ytvis19/results.json`` a perfect prediction of the held-out split
    that ``split`` will write (made after the split ran)."""
    shutil.copytree(demo_root, tmp_path / "ytvis19", ignore=shutil.ignore_patterns("train_1frame.json"))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    return tmp_path


def perfect_results(gt: Path, out: Path) -> None:
    anns = json.loads(gt.read_text())["annotations"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"video_id": a["video_id"], "category_id": a["category_id"], "score": 1.0,
                                "segmentations": a["segmentations"]} for a in anns]))


def test_runnable_readme_commands_run_as_written(workdir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for runnable, command in readme_commands():
        if not runnable:
            continue
        args = shlex.split(command)
        if "--results" in args:  # evaluate: the run's results.json, here the ground truth itself
            perfect_results(workdir / args[args.index("--gt") + 1], workdir / args[args.index("--results") + 1])
        argv = [sys.executable, "-m", "svis_ray", *args[1:]] if args[0] == "svis-ray" else [sys.executable, *args[1:]]
        r = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{command}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
        if args[1] == "evaluate":
            assert json.loads((workdir / args[args.index("--out") + 1]).read_text())["AP"] == pytest.approx(1.0)


def test_every_readme_svis_ray_command_parses(monkeypatch):
    from svis_ray.cli import build_parser
    from svis_ray.config import load_config
    from svis_ray.tuning import load_sweep

    monkeypatch.chdir(ROOT)  # the README's config paths are relative to the repository
    commands = [c for _, c in readme_commands() if c.startswith("svis-ray ")]
    assert len(commands) >= 8
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])
        if args.command == "tune":
            load_sweep(args.config, args.overrides)
        elif getattr(args, "config", None):
            load_config(args.config, args.overrides)
    for _, command in readme_commands():
        if command.startswith("python ") and not command.startswith("python -m"):
            assert (ROOT / shlex.split(command)[1]).exists(), command
