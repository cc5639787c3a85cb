"""Hyper-parameter sweeps with Ray Tune: every trial is one Ray Train run of the training config.

A sweep YAML names a base training config, a search space over dotted config keys and the Tune
settings (see configs/tune_debug.yaml). Each Tune trial is a *Train driver*: it builds the
trial's ``Config`` and calls ``run_training`` with a ``TuneReportCallback``, so the held-out AP
that training reports reaches Tune and ASHA stops weak trials early (the Train V2 + Tune pattern;
a V2 ``TorchTrainer`` cannot be passed to a ``Tuner``).

Resuming: trial ``T`` trains in ``<sweep dir>/trials/T`` (a stable name, so Train resumes it from
its last checkpoint) and re-running an interrupted sweep restores the Tune experiment, keeping the
finished trials. The sweep ends with ``summary.csv``/``summary.md`` (one row per trial) and
``best.yaml``, a complete training config that ``svis-ray train --config best.yaml`` runs.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from svis_ray.config import (Config, _build, _merge, absolute_paths, check_config, config_from_dict, load_config,
                             parse_overrides, save_config)
from svis_ray.console import log_file_for, with_log
from svis_ray import io as svis_io
from svis_ray.errors import SvisError

if TYPE_CHECKING:
    from svis_ray.data.ingest import SharedSplit

# Sweep YAML form -> Ray Tune domain. randint bounds are both inclusive (Tune's upper is not).
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
USER_ERROR = "user_error"  # result key: the SvisError that ended a trial, and so the sweep


@dataclass
class BaseSection:
    config: str = ""  # training config; a relative path is taken from the sweep file's folder
    overrides: list[str] = field(default_factory=list)  # key=value, applied to every trial


@dataclass
class TuneSection:
    num_samples: int = 8  # trials (times the size of any grid)
    metric: str = "val_AP"  # reported by training at evaluation steps
    mode: Literal["max", "min"] = "max"  # whether a higher or a lower metric is better
    max_concurrent_trials: int | None = None  # null: as many as the cluster's CPUs/GPUs hold
    searcher: Literal["random", "optuna"] = "random"  # optuna needs `pip install svis-ray[optuna]`
    seed: int = 0  # seed of the searcher
    grace_period: int | None = None  # ASHA: steps every trial runs before it may be stopped; null: max_t // 4
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_t: int | None = None  # ASHA's last rung in steps; null: the base train.max_steps
    max_failures: int = 1  # trial restarts (each resumes its Train run from its last checkpoint)
    # What Tune reserves for each trial's driver (it trains nothing: Train reserves the workers).
    # On a cluster whose head advertises no CPU: {CPU: 0, driver_slot: 1}, a slot only the head has
    driver_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})


@dataclass
class SweepConfig:
    base: BaseSection = field(default_factory=BaseSection)  # the training config every trial starts from
    search_space: dict[str, Any] = field(default_factory=dict)  # dotted config key -> {distribution: args}
    tune: TuneSection = field(default_factory=TuneSection)  # trials, searcher and ASHA early stopping
    name: str = "sweep"  # sweep name: its folder, and the Tune experiment that a re-run resumes
    storage_path: str = "runs/tune"  # the sweep folder is <storage_path>/<name>; shared storage or a URI on clusters


@dataclass
class Sweep:
    """A validated sweep: its settings and the base training config every trial starts from."""

    settings: SweepConfig
    base: Config  # with the base and command-line overrides applied
    source: str

    @property
    def dir(self) -> str:
        """The sweep folder: an absolute local path, or a URI (``s3://bucket/tune/sweep``)."""
        return svis_io.join(svis_io.absolute(self.settings.storage_path), self.settings.name)

    @property
    def num_trials(self) -> int:
        """Trials in the whole sweep: every sample runs each point of the grid."""
        grids = [len(spec["grid"]) for spec in self.settings.search_space.values() if "grid" in spec]
        return self.settings.tune.num_samples * math.prod(grids)

    @property
    def max_t(self) -> int:
        return self.settings.tune.max_t or self.base.train.max_steps

    @property
    def grace_period(self) -> int:
        return self.settings.tune.grace_period or max(1, self.max_t // 4)


# ----------------------------------------------------------------------------- loading and checks
def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep YAML; every mistake is a one-line ``SvisError`` naming the key.

    ``overrides`` are ``key=value`` items: ``tune.*``, ``base.*``, ``name``, ``storage_path`` and
    ``search_space.<dotted key>`` change the sweep, anything else (``data.root=...``) the base
    training config of every trial.
    """
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise SvisError(f"{path}: cannot read sweep config: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SvisError(f"{path}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SvisError(f"{path}: expected a mapping at the top level")
    sweep_items, train_items = _split_overrides(data, overrides or [], source)
    settings: SweepConfig = _build(SweepConfig, _merge(data, parse_overrides(sweep_items)), "", source)

    if not settings.base.config:
        raise SvisError(f"{source}: base.config: required (the training config every trial starts from)")
    base_path = Path(settings.base.config)
    if not base_path.is_absolute():
        base_path = Path(path).parent / base_path
    base = load_config(base_path, [*settings.base.overrides, *train_items])
    _check_tune(settings, base, source)
    if not settings.search_space:
        raise SvisError(f"{source}: search_space: empty (map dotted config keys to distributions)")
    for key, spec in settings.search_space.items():
        _check_distribution(str(key), spec, base.to_dict(), settings.tune.searcher, source)
    return Sweep(settings, base, source)


def _split_overrides(data: dict, overrides: list[str], source: str) -> tuple[list[str], list[str]]:
    """Apply ``search_space.*`` items to ``data`` in place; return (sweep items, training items)."""
    sweep_keys = {f.name for f in dataclasses.fields(SweepConfig)}
    sweep_items, train_items = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        top = key.strip().split(".", 1)[0]
        if sep and top == "search_space" and "." in key:
            # dotted config keys stay whole here: search_space.pseudo.weight -> "pseudo.weight"
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise SvisError(f"override {item!r}: malformed YAML value") from None
            space = data.setdefault("search_space", {})
            if not isinstance(space, dict):
                raise SvisError(f"{source}: search_space: expected a mapping")
            space[key.strip().split(".", 1)[1]] = value
        elif top in sweep_keys:
            sweep_items.append(item)
        else:
            train_items.append(item)
    return sweep_items, train_items


def _check_tune(s: SweepConfig, base: Config, source: str) -> None:
    t = s.tune
    if not s.name or Path(s.name).name != s.name:
        raise SvisError(f"{source}: name: expected a folder name without '/', got {s.name!r}")
    if t.num_samples < 1:
        raise SvisError(f"{source}: tune.num_samples: must be >= 1, got {t.num_samples}")
    if t.max_concurrent_trials is not None and t.max_concurrent_trials < 1:
        raise SvisError(f"{source}: tune.max_concurrent_trials: must be >= 1 or null, got {t.max_concurrent_trials}")
    if t.reduction_factor <= 1:
        raise SvisError(f"{source}: tune.reduction_factor: must be > 1, got {t.reduction_factor}")
    max_t = t.max_t or base.train.max_steps
    if t.grace_period is not None and not 1 <= t.grace_period <= max_t:
        raise SvisError(f"{source}: tune.grace_period: must be between 1 and max_t ({max_t}), got {t.grace_period}")
    if t.max_failures < 0:
        raise SvisError(f"{source}: tune.max_failures: must be >= 0, got {t.max_failures}")
    if t.searcher == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SvisError(f"{source}: tune.searcher: optuna is not installed (pip install 'svis-ray[optuna]')")


def _check_distribution(key: str, spec: Any, base: dict, searcher: str, source: str) -> None:
    """Check the distribution's form, then that every value it can produce is valid for ``key``."""
    where = f"{source}: search_space.{key}"
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
        raise SvisError(f"{where}: expected one of {{uniform: [a, b]}}, {{loguniform: [a, b]}}, "
                        f"{{randint: [a, b]}}, {{choice: [...]}}, {{grid: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if kind in ("uniform", "loguniform", "randint"):
        numbers = isinstance(args, list) and len(args) == 2 and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if not numbers or args[0] >= args[1]:
            raise SvisError(f"{where}: {kind} needs [low, high] with low < high, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise SvisError(f"{where}: loguniform needs low > 0, got {args!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SvisError(f"{where}: randint needs integer bounds, got {args!r}")
        candidates = args if kind == "randint" else [float(a) for a in args]
    else:
        if not isinstance(args, list) or not args:
            raise SvisError(f"{where}: {kind} needs a non-empty list of values, got {args!r}")
        if kind == "grid" and searcher == "optuna":
            raise SvisError(f"{where}: grid is not supported with tune.searcher=optuna (use choice)")
        candidates = args
    prefix = f"{source}: search_space"  # then the config's own one-line error, e.g. "train.lr: expected float"
    for value in candidates:
        check_config(config_from_dict(_with_value(base, key, value, where), source=prefix), prefix)


def _with_value(base: dict, key: str, value: Any, where: str) -> dict:
    """A copy of config dict ``base`` with dotted ``key`` set to ``value``."""
    data = copy.deepcopy(base)
    node = data
    *sections, last = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SvisError(f"{where}: '{part}' is not a config section")
    node[last] = value
    return data


# ----------------------------------------------------------------------------- Tune pieces
def param_space(sweep: Sweep) -> dict[str, Any]:
    """The Tune search space, keyed by the dotted config keys."""
    from ray import tune

    space = {}
    for key, spec in sweep.settings.search_space.items():
        kind, args = next(iter(spec.items()))
        if kind == "uniform":
            space[key] = tune.uniform(*args)
        elif kind == "loguniform":
            space[key] = tune.loguniform(*args)
        elif kind == "randint":
            space[key] = tune.randint(args[0], args[1] + 1)
        elif kind == "choice":
            space[key] = tune.choice(args)
        else:
            space[key] = tune.grid_search(args)
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any], output_dir: str) -> Config:
    """The training config of one trial: ``base`` (a ``Config.to_dict()``) with the sampled values."""
    data = base
    for key, value in params.items():
        # numpy scalars (Tune's samplers) -> plain Python, which the typed config expects
        data = _with_value(data, key, value.item() if hasattr(value, "item") else value, key)
    data = _with_value(data, "output.dir", output_dir, "output.dir")
    return config_from_dict(data, source="trial")


def trial_resources(cfg: Config, driver: dict[str, float] | None = None) -> dict[str, float]:
    """What one trial holds while it trains: its driver (``tune.driver_resources``), the Train
    workers, the teacher actors."""
    from svis_ray.train import worker_resources

    need = {k: float(v) for k, v in (driver if driver is not None else {"CPU": 1.0}).items()}
    for k, v in worker_resources(cfg).items():
        need[k] = need.get(k, 0.0) + cfg.train.num_workers * v
    if cfg.teacher.mode != "online":
        need["GPU"] = need.get("GPU", 0.0) + cfg.teacher.num_teachers * cfg.teacher.gpus_per_teacher
        if cfg.teacher.node_resource:
            need[cfg.teacher.node_resource] = need.get(cfg.teacher.node_resource, 0.0) + cfg.teacher.num_teachers
    return need


def default_concurrency(cfg: Config, cluster: dict[str, float], driver: dict[str, float] | None = None) -> int:
    """How many trials the cluster's current resources hold at once (at least 1).

    An autoscaling cluster reports only the nodes it has now; set ``tune.max_concurrent_trials``
    there instead.
    """
    fits = [math.floor(cluster.get(k, 0.0) / need + 1e-9)
            for k, need in trial_resources(cfg, driver).items() if need > 0]
    return max(1, min(fits))


def _run_trial(params: dict[str, Any], base_config: dict[str, Any], trials_dir: str, metric: str,
               split: SharedSplit | None = None) -> None:
    """One Tune trial: a Ray Train run whose reports are forwarded to Tune. ``split``: the sweep's
    shared training split, used unless the trial's sampled config names another one."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from svis_ray.train import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base_config, params, svis_io.join(trials_dir, trial_id))
    try:
        run_training(cfg, callbacks=[TuneReportCallback()], split=split)
    except SvisError as e:
        # Reported, not raised: Tune would retry the trial (tune.max_failures), which cannot fix a
        # bad frame or file; the stopper ends the sweep on it and run_sweep prints the one line.
        tune.report({USER_ERROR: str(e), "step": 0, metric: float("nan")})


def _user_error_stopper():
    """A Tune stopper that ends the whole sweep when a trial reports a user error: the trials share
    the data and the base config, so the others would fail the same way."""
    from ray import tune

    class StopOnUserError(tune.Stopper):
        def __init__(self) -> None:
            self.failed = False

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            self.failed = self.failed or bool(result.get(USER_ERROR))
            return bool(result.get(USER_ERROR))

        def stop_all(self) -> bool:
            return self.failed

    return StopOnUserError()


def _search_algorithm(sweep: Sweep, concurrency: int):
    t = sweep.settings.tune
    if t.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=t.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # max_concurrent goes here: Tune ignores TuneConfig.max_concurrent_trials for a generator instance
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=t.seed)


def build_tuner(sweep: Sweep, split: SharedSplit | None = None):
    """A new ``Tuner`` for ``sweep``, or the restored one when its folder holds an experiment.
    ``split``: the base config's training split, shared by every trial (parsed once per sweep)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base_config=absolute_paths(sweep.base).to_dict(),
                             trials_dir=svis_io.join(sweep.dir, "trials"), metric=sweep.settings.tune.metric,
                             split=split),
        dict(sweep.settings.tune.driver_resources))
    if tune.Tuner.can_restore(str(sweep.dir)):
        print(f"resuming the sweep in {sweep.dir}", flush=True)
        return tune.Tuner.restore(str(sweep.dir), trainable, resume_unfinished=True, resume_errored=True)
    t = sweep.settings.tune
    concurrency = t.max_concurrent_trials or default_concurrency(sweep.base, ray.cluster_resources(),
                                                                  t.driver_resources)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples,
            search_alg=_search_algorithm(sweep, concurrency),
            # time_attr "step": rungs are training steps, whatever the report frequency.
            # stop_last_trials=False: a trial that reaches max_t ends by itself, so run_training
            # still writes its best.pt and metrics.json instead of being killed at its last report.
            scheduler=ASHAScheduler(time_attr="step", max_t=sweep.max_t, grace_period=sweep.grace_period,
                                    reduction_factor=t.reduction_factor, stop_last_trials=False)),
        run_config=tune.RunConfig(name=sweep.settings.name, storage_path=svis_io.parent(sweep.dir),
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                  stop=_user_error_stopper(), verbose=1),
    )


# ----------------------------------------------------------------------------- results
def summarize(results, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial: its parameters and its best evaluation by the sweep metric, best first."""
    metric, mode = sweep.settings.tune.metric, sweep.settings.tune.mode
    rows = []
    for r in results:
        metrics = r.metrics or {}
        row: dict[str, Any] = {"trial": metrics.get("trial_id", Path(r.path).name)}
        row.update({k: (v.item() if hasattr(v, "item") else v) for k, v in sorted(r.config.items())})
        best = None
        df = r.metrics_dataframe
        if df is not None and metric in df:
            # reports that bring a held-out evaluation (it lags: val_step names its checkpoint)
            brings = df["val_step"].fillna(-1) >= 0 if "val_step" in df else df.index < 0
            # a held-out metric counts only where an evaluation came in; a training one anywhere
            pick = df[df[metric].notna() & (brings if metric.startswith("val_") else True)]
            if len(pick):
                best = pick.loc[pick[metric].idxmax() if mode == "max" else pick[metric].idxmin()]
        evaluated = best is not None and "val_step" in best and best["val_step"] >= 0
        row["score"] = float(best[metric]) if best is not None else None
        row["AP"] = float(best["val_AP"]) if evaluated else None
        row["AP50"] = float(best["val_AP50"]) if evaluated and "val_AP50" in best else None
        row["eval_step"] = int(best["val_step"]) if evaluated else None
        row["steps"] = int(metrics.get("step", 0))
        max_steps = r.config.get("train.max_steps", sweep.base.train.max_steps)
        row["status"] = ("error" if r.error else "completed" if row["steps"] >= max_steps
                         else "stopped early")
        row["error"] = _one_line(r.error) if r.error else ""
        rows.append(row)
    sign = 1 if mode == "max" else -1
    return sorted(rows, key=lambda x: (x["score"] is None, -sign * (x["score"] or 0.0)))


def _one_line(error: BaseException) -> str:
    from svis_ray.train import user_error_in

    lines = str(error).strip().splitlines()
    return user_error_in(error) or (lines[-1][:200] if lines else type(error).__name__)


def format_summary(rows: list[dict[str, Any]], sweep: Sweep) -> str:
    """A Markdown table of the trials (AP and AP50 in percent), with the sweep metric's column
    when the sweep ranks on something other than val_AP."""
    def pct(v: float | None) -> str:
        return f"{100 * v:.1f}" if v is not None and v >= 0 else "-"

    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    params = list(sweep.settings.search_space)
    metric = [sweep.settings.tune.metric] if sweep.settings.tune.metric != "val_AP" else []
    head = ["trial", *params, *metric, "AP", "AP50", "eval step", "steps", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"], *(num(r.get(p)) for p in params), *(num(r["score"]) for _ in metric),
                 pct(r["AP"]), pct(r["AP50"]), num(r["eval_step"] if r["eval_step"] is not None else "-"),
                 num(r["steps"]), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(rows: list[dict[str, Any]], sweep: Sweep) -> None:
    fields = ["trial", *sweep.settings.search_space, "score", "AP", "AP50", "eval_step", "steps", "status", "error"]
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    svis_io.write_text(svis_io.join(sweep.dir, "summary.csv"), text.getvalue())
    svis_io.write_text(svis_io.join(sweep.dir, "summary.md"), format_summary(rows, sweep) + "\n")


def best_config(sweep: Sweep, params: dict[str, Any]) -> Config:
    """The base config with the best trial's values, training into its own fresh folder."""
    out = svis_io.join(sweep.settings.storage_path, sweep.settings.name, "best_run")
    return trial_config(sweep.base.to_dict(), params, out)


# ----------------------------------------------------------------------------- entry point
def run_sweep(config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Run (or resume) the sweep in ``config_path``; write the summary and ``best.yaml``.

    Returns ``{"sweep_dir", "trials": rows (best first), "best": row, "best_config": path}``.
    """
    from ray import tune

    from svis_ray.train import ray_init, training_split

    sweep = load_sweep(config_path, overrides)
    log = ray_init(log_file_for(sweep.dir))
    # One parse for the whole sweep: the trials (and their worker-group restarts) share its index.
    split = training_split(absolute_paths(sweep.base))
    results = build_tuner(sweep, split).fit()
    user_errors = [r.metrics[USER_ERROR] for r in results if r.metrics and r.metrics.get(USER_ERROR)]
    if user_errors:
        raise SvisError(with_log(user_errors[0], log))
    # Ctrl+C makes fit() return early, marking the unfinished trials terminated in `results`;
    # the experiment state Tune saved (what a resume reads) still lists them as pending/running.
    saved = tune.ExperimentAnalysis(str(sweep.dir)).trials
    if sum(t.status in ("TERMINATED", "ERROR") for t in saved) < sweep.num_trials:
        print(f"sweep interrupted; run the same command again to resume it from {sweep.dir}", flush=True)
        raise KeyboardInterrupt
    rows = summarize(results, sweep)
    print(format_summary(rows, sweep), flush=True)
    write_summary(rows, sweep)
    if rows[0]["score"] is None:
        first = next((r["error"] for r in rows if r["error"]), "no evaluation reported")
        raise SvisError(f"{sweep.dir}: no trial reported {sweep.settings.tune.metric}; first error: {first}")
    path = svis_io.join(sweep.dir, "best.yaml")
    save_config(best_config(sweep, {k: rows[0][k] for k in sweep.settings.search_space}), path)
    print(f"sweep folder: {sweep.dir}; best trial {rows[0]['trial']} ({sweep.settings.tune.metric} "
          f"{rows[0]['score']:.4g}); train it with: svis-ray train --config {path}", flush=True)
    return {"sweep_dir": str(sweep.dir), "trials": rows, "best": rows[0], "best_config": str(path)}
