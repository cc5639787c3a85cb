"""Sweeps: the sweep YAML's validation and search space (no Ray), then real CPU sweeps with
configs/tune_debug.yaml: ASHA stopping, the summary and best.yaml, and resuming an interrupted sweep."""
import csv
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from svis_ray.config import absolute_paths, load_config, save_config
from svis_ray.errors import SvisError
from svis_ray.tuning import (best_config, default_concurrency, format_summary, load_sweep, param_space,
                             summarize, trial_config)

ROOT = Path(__file__).resolve().parent.parent
TUNE_DEBUG = ROOT / "configs" / "tune_debug.yaml"
SWEEP_CONFIGS = sorted((ROOT / "configs").glob("tune*.yaml"))


def write_sweep(tmp_path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(f"base:\n  config: {ROOT / 'configs' / 'debug.yaml'}\n" + text)
    return p


# ----------------------------------------------------------------------------- parsing, no Ray
@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=lambda p: p.name)
def test_shipped_sweeps_load(path):
    sweep = load_sweep(path)
    assert sweep.grace_period < sweep.max_t <= sweep.base.train.max_steps
    # the search space covers the semi-supervised knobs and the loss weights
    assert {"pseudo.score_threshold", "pseudo.mask_threshold", "pseudo.weight", "pseudo.ramp_steps",
            "teacher.ema_momentum", "pseudo.anchor_iou", "loss.class_weight", "loss.mask_weight",
            "loss.dice_weight"} <= set(sweep.settings.search_space)


def test_cluster_sweep_ranks_on_held_out_ap():
    sweep = load_sweep(ROOT / "configs" / "tune_ytvis19_r50.yaml")
    t, train = sweep.settings.tune, sweep.base.train
    assert (t.metric, t.mode) == ("val_AP", "max")
    # held-out AP exists at every ASHA rung: evaluations run at checkpoints, rungs are multiples
    assert train.eval_every % train.checkpoint_every == 0 and t.grace_period % train.eval_every == 0


def test_tune_debug_is_small():
    sweep = load_sweep(TUNE_DEBUG)
    cfg, t = sweep.base, sweep.settings.tune
    assert sweep.num_trials >= 4 and t.max_concurrent_trials <= 2
    assert cfg.train.max_steps <= 12 and cfg.train.num_workers == 1 and cfg.teacher.num_teachers == 1
    assert not cfg.train.use_gpu and cfg.teacher.gpus_per_teacher == 0


@pytest.mark.parametrize("text, message", [
    ("tune:\n  num_sample: 3\nsearch_space:\n  pseudo.weight: {uniform: [0, 1]}\n",
     "tune.num_sample: unknown key (did you mean 'num_samples'?)"),
    ("serch_space:\n  pseudo.weight: {uniform: [0, 1]}\n", "serch_space: unknown key (did you mean 'search_space'?)"),
    ("search_space:\n  pseudo.score_treshold: {uniform: [0.5, 0.9]}\n",
     "search_space: pseudo.score_treshold: unknown key (did you mean 'score_threshold'?)"),
    ("search_space:\n  psuedo.weight: {uniform: [0, 1]}\n", "search_space: psuedo: unknown key (did you mean 'pseudo'?)"),
    ("search_space:\n  pseudo.weight: {normal: [0, 1]}\n", "search_space.pseudo.weight: expected one of {uniform"),
    ("search_space:\n  pseudo.weight: [0.5, 1.0]\n", "search_space.pseudo.weight: expected one of {uniform"),
    ("search_space:\n  pseudo.weight: {uniform: [1, 0.5]}\n", "uniform needs [low, high] with low < high"),
    ("search_space:\n  pseudo.weight: {uniform: [0.5]}\n", "uniform needs [low, high] with low < high"),
    ("search_space:\n  train.lr: {loguniform: [0, 0.1]}\n", "loguniform needs low > 0"),
    ("search_space:\n  pseudo.ramp_steps: {randint: [0.5, 10]}\n", "randint needs integer bounds"),
    ("search_space:\n  pseudo.weight: {choice: []}\n", "choice needs a non-empty list"),
    # every value a distribution can produce must type-check against the config field
    ("search_space:\n  train.max_steps: {uniform: [4, 8]}\n", "train.max_steps: expected int, got 4.0"),
    ("search_space:\n  teacher.mode: {choice: [ema, mean]}\n", "teacher.mode: expected one of"),
    ("search_space:\n  pseudo: {choice: [1]}\n", "pseudo: expected a mapping"),
    ("search_space:\n  train.max_steps: {choice: [1000, 100]}\n",
     "lie beyond train.max_steps=100"),
    ("search_space: {}\n", "search_space: empty"),
    ("tune:\n  grace_period: 1000\nsearch_space:\n  pseudo.weight: {uniform: [0, 1]}\n",
     "tune.grace_period: must be between 1 and max_t ("),
    ("tune:\n  reduction_factor: 1\nsearch_space:\n  pseudo.weight: {uniform: [0, 1]}\n",
     "tune.reduction_factor: must be > 1"),
    ("tune:\n  mode: maximum\nsearch_space:\n  pseudo.weight: {uniform: [0, 1]}\n", "tune.mode: expected one of"),
])
def test_bad_sweep_fails_with_one_line(tmp_path, text, message):
    path = write_sweep(tmp_path, text)
    with pytest.raises(SvisError) as e:
        load_sweep(path)
    assert message in str(e.value)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_grace_period_defaults_to_a_quarter_of_max_t(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, "search_space:\n  pseudo.weight: {uniform: [0, 1]}\n"))
    assert sweep.settings.tune.grace_period is None and sweep.grace_period == sweep.base.train.max_steps // 4


def test_missing_base_and_bad_base_override(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text("search_space:\n  pseudo.weight: {uniform: [0, 1]}\n")
    with pytest.raises(SvisError, match="base.config: required"):
        load_sweep(p)
    p = write_sweep(tmp_path, "  overrides: [train.max_step=3]\nsearch_space:\n  pseudo.weight: {uniform: [0, 1]}\n")
    with pytest.raises(SvisError, match="debug.yaml: train.max_step: unknown key"):
        load_sweep(p)


@pytest.mark.skipif(__import__("importlib").util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_missing_is_one_line(tmp_path):
    with pytest.raises(SvisError, match=r"tune.searcher: optuna is not installed \(pip install 'svis-ray\[optuna\]'\)"):
        load_sweep(TUNE_DEBUG, ["tune.searcher=optuna"])


def test_overrides_go_to_the_sweep_or_to_every_trial():
    sweep = load_sweep(TUNE_DEBUG, ["tune.num_samples=2", "name=other", "data.root=/data/x", "train.max_steps=10",
                                    "search_space.pseudo.topk={grid: [5, 10]}"])
    assert sweep.settings.tune.num_samples == 2 and sweep.settings.name == "other"
    assert sweep.base.data.root == "/data/x" and sweep.base.train.max_steps == 10
    assert sweep.settings.search_space["pseudo.topk"] == {"grid": [5, 10]}
    assert sweep.base.train.num_workers == 1  # the base overrides still apply
    with pytest.raises(SvisError, match="train.max_stepz: unknown key"):
        load_sweep(TUNE_DEBUG, ["train.max_stepz=3"])


def test_param_space_samples_inside_the_bounds(tmp_path):
    path = write_sweep(tmp_path, "search_space:\n"
                       "  pseudo.weight: {uniform: [0.5, 1.5]}\n"
                       "  train.lr: {loguniform: [0.0001, 0.01]}\n"
                       "  pseudo.ramp_steps: {randint: [3, 4]}\n"
                       "  teacher.ema_momentum: {choice: [0.9, 0.99]}\n"
                       "  pseudo.topk: {grid: [5, 10]}\n")
    space = param_space(load_sweep(path))
    rng = np.random.default_rng(0)
    assert all(0.5 <= space["pseudo.weight"].sample(random_state=rng) <= 1.5 for _ in range(50))
    assert all(1e-4 <= space["train.lr"].sample(random_state=rng) <= 1e-2 for _ in range(50))
    assert {space["pseudo.ramp_steps"].sample(random_state=rng) for _ in range(50)} == {3, 4}  # both bounds
    assert {space["teacher.ema_momentum"].sample(random_state=rng) for _ in range(50)} == {0.9, 0.99}
    assert space["pseudo.topk"] == {"grid_search": [5, 10]}


def test_trial_config_applies_values_and_its_own_folder():
    base = load_config(ROOT / "configs" / "debug.yaml").to_dict()
    cfg = trial_config(base, {"pseudo.weight": np.float64(0.25), "pseudo.ramp_steps": np.int64(7),
                              "loss.dice_weight": 3}, "/runs/sweep/trials/abc")
    assert cfg.pseudo.weight == 0.25 and type(cfg.pseudo.weight) is float
    assert cfg.pseudo.ramp_steps == 7 and type(cfg.pseudo.ramp_steps) is int
    assert cfg.loss.dice_weight == 3.0 and cfg.output.dir == "/runs/sweep/trials/abc"
    assert base["pseudo"]["weight"] == 1.0  # the base is not modified


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = load_config(ROOT / "configs" / "debug.yaml", ["data.root=data", "model.weights=missing.pt"])
    data = absolute_paths(cfg).to_dict()
    assert data["data"]["root"] == str(tmp_path / "data")
    assert data["model"]["weights"] == "missing.pt"  # not here: left as given


def test_default_concurrency_follows_cluster_resources():
    debug = load_sweep(TUNE_DEBUG).base  # 1 driver CPU + 1 worker CPU, no GPU
    assert default_concurrency(debug, {"CPU": 8.0, "GPU": 2.0}) == 4
    assert default_concurrency(debug, {"CPU": 1.0}) == 1  # never 0
    gpu = load_sweep(ROOT / "configs" / "tune_ytvis19_r50.yaml").base  # 8 student + 2 teacher GPUs
    roles = {"student_node": 16.0, "teacher_node": 4.0}  # cluster.yaml at max_workers
    assert default_concurrency(gpu, {"CPU": 400.0, "GPU": 20.0, **roles}) == 2
    assert default_concurrency(gpu, {"CPU": 400.0, "GPU": 19.0, **roles}) == 1
    assert default_concurrency(gpu, {"CPU": 400.0, "GPU": 20.0, "student_node": 8.0, "teacher_node": 4.0}) == 1
    # drivers on the zero-CPU head: its driver slots bound the trials too
    assert default_concurrency(gpu, {"GPU": 20.0, **roles, "driver_slot": 1.0}, {"CPU": 0.0, "driver_slot": 1.0}) == 1


def fake_result(trial, config, steps, evals, error=None):
    """A stand-in for a Tune ``Result``: ``evals`` maps a checkpoint's step -> its (AP, AP50). As in
    a run, an evaluation arrives one report later (``val_step`` names it), the last one in place."""
    arrives = {(s + 2 if s < steps else s): s for s in evals}
    rows = []
    best = -1.0
    for step in range(2, steps + 1, 2):
        row = {"step": step, "trial_id": trial, "val_AP": best, "val_step": -1, "loss_dice": 1.0 / step}
        if step in arrives:
            row["val_step"] = arrives[step]
            row["val_AP"], row["val_AP50"] = evals[arrives[step]]
            best = max(best, row["val_AP"])
        rows.append(row)
    return SimpleNamespace(metrics=rows[-1], config=config, metrics_dataframe=pd.DataFrame(rows), error=error,
                           path=f"/x/{trial}")


def test_summary_ranks_by_best_evaluation_and_names_early_stops(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, "  overrides: [train.max_steps=12, \"train.milestones=[]\"]\n"
                                             "search_space:\n  pseudo.weight: {uniform: [0.5, 2]}\n"
                                             "tune:\n  grace_period: 4\nname: s\nstorage_path: out\n"))
    results = [
        fake_result("a", {"pseudo.weight": 0.5}, 12, {4: (0.10, 0.20), 8: (0.30, 0.50), 12: (0.25, 0.45)}),
        fake_result("b", {"pseudo.weight": 1.0}, 4, {4: (0.05, 0.10)}),
        fake_result("c", {"pseudo.weight": 2.0}, 2, {}, error=RuntimeError("SvisError: data.json: not found")),
    ]
    rows = summarize(results, sweep)
    assert [r["trial"] for r in rows] == ["a", "b", "c"]
    assert (rows[0]["AP"], rows[0]["AP50"], rows[0]["eval_step"], rows[0]["status"]) == (0.30, 0.50, 8, "completed")
    assert rows[1]["status"] == "stopped early" and rows[1]["steps"] == 4
    assert rows[2]["status"] == "error" and rows[2]["AP"] is None and rows[2]["error"] == "data.json: not found"
    table = format_summary(rows, sweep)
    assert "| a | 0.5 | 30.0 | 50.0 | 8 | 12 | completed |" in table
    # a training metric ranks on every report; AP columns only where the best report brought one
    by_dice = summarize(results, SimpleNamespace(settings=SimpleNamespace(
        tune=SimpleNamespace(metric="loss_dice", mode="min")), base=sweep.base))
    assert [(r["trial"], r["score"], r["eval_step"]) for r in by_dice] == [("a", 1 / 12, 12), ("b", 0.25, 4),
                                                                        ("c", 0.5, None)]

    best = best_config(sweep, {"pseudo.weight": rows[0]["pseudo.weight"]})
    path = tmp_path / "best.yaml"
    save_config(best, path)
    loaded = load_config(path)
    assert loaded.pseudo.weight == 0.5 and loaded.train.max_steps == sweep.base.train.max_steps
    assert loaded.output.dir == "out/s/best_run"


# ----------------------------------------------------------------------------- real sweeps (Ray)
@pytest.fixture(scope="module")
def sweep_data(demo_root):
    """The session demo data with its 1-labelled-frame training subset."""
    from svis_ray.data.sparsify import sparsify

    sparsify(str(demo_root / "train.json"), str(demo_root / "train_1frame.json"), frames_per_video=1,
             strategy="middle", seed=0)
    return demo_root


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_debug_sweep_end_to_end(ray_local, sweep_data, tmp_path):
    from svis_ray.tuning import run_sweep

    out = run_sweep(str(TUNE_DEBUG), [f"data.root={sweep_data}", f"storage_path={tmp_path}"])
    sweep_dir = tmp_path / "tune_debug"
    rows = out["trials"]
    assert out["sweep_dir"] == str(sweep_dir) and len(rows) == 4
    assert all(r["status"] in ("completed", "stopped early") for r in rows), rows
    # ASHA compared the trials at step 8 and stopped a trial of the arm that barely learns there;
    # the learning arm's trials ran to the end
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["steps"] == 8 and r["train.lr"] == 1e-6 for r in stopped), rows
    assert all(r["status"] == "completed" and r["steps"] == 12 for r in rows if r["train.lr"] == 1e-3), rows
    for r in rows:  # each trial trained in its own run folder
        steps = [int(x["step"]) for x in read_csv(sweep_dir / "trials" / r["trial"] / "metrics.csv")]
        assert steps[-1] == r["steps"]
    assert len(read_csv(sweep_dir / "summary.csv")) == 4
    assert (sweep_dir / "summary.md").read_text().count("\n") == 6  # header, rule, 4 trials

    best = load_config(out["best_config"])
    params = load_sweep(TUNE_DEBUG).settings.search_space
    assert all(getattr(getattr(best, k.split(".")[0]), k.split(".")[1]) == pytest.approx(out["best"][k])
               for k in params)
    assert best.data.root == str(sweep_data) and best.train.max_steps == 12
    assert not Path(best.output.dir).exists()  # a fresh run folder for training the winner
    assert out["best"]["train.lr"] == 1e-3
    assert out["best"]["score"] == min(r["score"] for r in rows)  # tune_debug ranks on loss_dice, min


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_sweep_resumes(ray_local, sweep_data, tmp_path):
    from svis_ray.tuning import run_sweep

    args = [f"data.root={sweep_data}", f"storage_path={tmp_path}", "tune.num_samples=1",  # 2 trials
            "tune.max_concurrent_trials=1"]
    trials = tmp_path / "tune_debug" / "trials"
    log = open(tmp_path / "first_run.log", "w")
    # Run the sweep in its own process (with its own Ray) and press Ctrl+C once a trial finished.
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "tune.py"), "--config", str(TUNE_DEBUG), *args],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not list(trials.glob("*/best.pt")):
            assert proc.poll() is None, (tmp_path / "first_run.log").read_text()[-3000:]
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130, (tmp_path / "first_run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    (first,) = [p.parent.name for p in trials.glob("*/best.pt")]
    first_steps = [int(x["step"]) for x in read_csv(trials / first / "metrics.csv")]
    assert not (tmp_path / "tune_debug" / "best.yaml").exists()  # interrupted: no result yet

    out = run_sweep(str(TUNE_DEBUG), args)
    rows = {r["trial"]: r for r in out["trials"]}
    assert len(rows) == 2 and first in rows  # the restored experiment, not a new one
    # the finished trial kept its results and did not train again
    assert [int(x["step"]) for x in read_csv(trials / first / "metrics.csv")] == first_steps
    assert rows[first]["steps"] == first_steps[-1] == 12 and rows[first]["status"] == "completed"
    assert all(r["status"] != "error" for r in rows.values())
    assert Path(out["best_config"]).exists()
