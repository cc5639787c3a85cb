"""Typed run configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every key is checked at start: an unknown key or a value of the wrong type fails with one line
naming the key (``configs/x.yaml: train.max_step: unknown key (did you mean 'max_steps'?)``),
so a typo never silently falls back to a default after an hour on a cluster.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from svis_ray.errors import SvisError


@dataclass
class DataConfig:
    root: str = "demo_data"  # dataset folder holding JPEGImages/ (local path or pyarrow.fs URI: s3://, gs://)
    train_json: str = "train_1frame.json"  # relative paths are taken under `root`
    val_json: str = "val.json"  # held-out split with full annotations (periodic and final evaluation)
    min_size_train: list[int] = field(default_factory=lambda: [360, 480])  # short side, one chosen per clip
    max_size_train: int = 1333
    min_size_test: int = 360
    max_size_test: int = 1333
    flip: bool = True
    unlabelled_per_clip: int = 2  # Sparse-MinVIS: 1 labelled + 2 unlabelled frames per video and step
    unlabelled_max_gap: int = 0  # unlabelled frames within this many frames of the labelled one; 0 = any
    clips_per_step: int = 2  # clips per worker and step (a clip = the frames of one video)
    on_bad_frame: Literal["fail", "skip"] = "fail"
    decode_cpus: float = 0.25  # logical CPUs per decode task (small: Train holds whole CPUs)
    decode_tasks: int = 8  # decode tasks in flight at most (each is a process; match the node's cores)


@dataclass
class ModelSection:
    preset: Literal["tiny", "minvis_r50"] = "tiny"
    weights: str | None = None  # torchvision ResNet / Mask2Former .pkl / MinVIS .pth / svis-ray checkpoint
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. {num_queries: 50}


@dataclass
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    eos_coef: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


@dataclass
class TrainConfig:
    max_steps: int = 6000
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_multiplier: float = 0.1
    clip_norm: float = 0.01
    warmup_steps: int = 10
    milestones: list[int] = field(default_factory=lambda: [4000])
    gamma: float = 0.1
    amp: bool = True  # only takes effect on CUDA
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 500
    num_to_keep: int = 2
    max_failures: int = 3
    eval_every: int = 500  # periodic held-out evaluation (rank 0), 0 = only at the end
    log_every: int = 10
    seed: int = 0
    torch_threads: int = 0  # intra-op threads per worker on CPU; 0 = torch default


@dataclass
class TeacherConfig:
    mode: Literal["ema", "frozen", "online"] = "ema"
    num_teachers: int = 1
    gpus_per_teacher: float = 1.0  # fractional values share a GPU; 0 = CPU teachers
    checkpoint: str | None = None  # frozen mode: the fixed teacher weights
    ema_momentum: float = 0.999
    publish_every: int = 50  # rank 0 publishes the EMA weights every K steps
    warmup_steps: int = 0  # pseudo-labels are ignored (weight 0) before this step
    batch_size: int = 2  # clips per teacher call
    window: int = 30  # frames per teacher forward chunk
    # Object store the training stream may fill ahead of the student: bounds memory and how far
    # fast teachers run ahead with old weights (the teacher_lag metric).
    max_buffer_mb: int = 1024


@dataclass
class PseudoConfig:
    topk: int = 10
    score_threshold: float = 0.8  # Sparse-MinVIS class-score threshold
    mask_threshold: float = 0.0  # mask logit threshold
    min_area: int = 16  # pixels, at training resolution
    # Class-agnostic mask NMS among a frame's pseudo-labels (anchored first, then by score): drops
    # a second query on an object already labelled. 1 = off (Sparse-MinVIS); 0.5 raised precision
    # 65 -> 80% on the demo data but not held-out AP (README, Results), so it is off by default.
    nms_iou: float = 1.0
    # Snap each kept mask to the frame's colour edges with OpenCV's GrabCut, seeded by the mask
    # (inside: probable foreground; a 3-pixel band around it: probable background; beyond: background).
    # The teacher predicts masks at 1/4 resolution, so thin parts and holes blur; on the demo
    # data GrabCut raised their mean IoU with the ground truth 0.70 -> 0.81 (README, Results).
    # Off by default: on the CPU it costs ~20 ms a mask at 96x128 but ~170 ms at 360x640.
    refine: Literal["none", "grabcut"] = "none"
    keep_empty: bool = True  # frames with nothing kept still train as background
    anchor: bool = True  # ground-truth-anchored pseudo-labels
    anchor_iou: float = 0.5
    anchor_score_threshold: float = 0.3  # anchored tracks pass at this lower foreground score
    weight: float = 1.0  # lambda_pseudo
    # No-object weight (x lambda) of the queries a pseudo-labelled frame leaves unmatched. 1 trains
    # every object the teacher did not keep as background (Sparse-MinVIS); lower values stop the
    # student from unlearning the objects the teacher missed.
    background_weight: float = 1.0
    ramp_steps: int = 0  # lambda_pseudo ramps linearly from 0 over the first N steps
    # Colour jitter, greyscale and blur on the student's copy of each teacher-labelled frame (the
    # teacher saw it clean): the student learns the teacher's labels under noise, as in Mean
    # Teacher / Unbiased Teacher. Geometry is untouched, so the masks still fit. Ground-truth
    # frames and online self-labelling (no teacher) are never augmented this way.
    strong_aug: bool = False
    store: Literal["none", "parquet"] = "none"


@dataclass
class InferenceConfig:
    # How held-out evaluation, teachers (pseudo-label anchoring) and predict link frames into
    # tracks (svis_ray/tracking.py): "minvis" = MinVIS's embedding-only matching; "svis" adds a
    # mask-IoU matching cost and empties masks where the query predicts no-object.
    tracker: Literal["minvis", "svis"] = "minvis"
    topk: int = 10  # tracks kept per video (MinVIS keeps the top 10 (query, class) pairs)
    window: int = 30  # frames per model forward in evaluation (memory bound; results do not depend on it)


@dataclass
class OutputConfig:
    dir: str = "runs/debug"  # run folder: checkpoints, logs, results.json, metrics.json, best.pt
    progress_bar: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float only) or raise ``SvisError``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, where)
            except SvisError:
                continue
        raise SvisError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise SvisError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SvisError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SvisError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise SvisError(f"{where}: expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise SvisError(f"{where}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise SvisError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


def _build(cls: type, data: Any, where: str, source: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise SvisError(f"{source}: {where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise SvisError(f"{source}: {path}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path, source)
        else:
            try:
                kwargs[key] = _check_type(value, tp, path)
            except SvisError as e:
                raise SvisError(f"{source}: {e}") from None
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise SvisError(f"override {dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=10", "data.min_size_train=[96,128]"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SvisError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_config(cfg: Config, source: str = "config") -> Config:
    """Cross-field checks that types alone cannot express; fail before Ray starts."""
    t = cfg.train
    late = [m for m in t.milestones if m > t.max_steps]
    if late:
        raise SvisError(f"{source}: train.milestones {late} lie beyond train.max_steps={t.max_steps} "
                        f"(set train.milestones too, e.g. train.milestones=[])")
    positive = {"train.max_steps": t.max_steps, "train.checkpoint_every": t.checkpoint_every,
                "train.log_every": t.log_every, "train.num_workers": t.num_workers,
                "data.clips_per_step": cfg.data.clips_per_step, "teacher.publish_every": cfg.teacher.publish_every,
                "teacher.num_teachers": cfg.teacher.num_teachers, "teacher.batch_size": cfg.teacher.batch_size,
                "inference.topk": cfg.inference.topk, "inference.window": cfg.inference.window}
    for key, value in positive.items():
        if value < 1:
            raise SvisError(f"{source}: {key} must be >= 1, got {value}")
    if cfg.data.unlabelled_max_gap < 0:
        raise SvisError(f"{source}: data.unlabelled_max_gap must be >= 0 (0 = any frame), "
                        f"got {cfg.data.unlabelled_max_gap}")
    p = cfg.pseudo
    unit = {"pseudo.score_threshold": p.score_threshold, "pseudo.anchor_iou": p.anchor_iou,
            "pseudo.anchor_score_threshold": p.anchor_score_threshold, "pseudo.nms_iou": p.nms_iou,
            "pseudo.background_weight": p.background_weight, "teacher.ema_momentum": cfg.teacher.ema_momentum}
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise SvisError(f"{source}: {key} must lie in [0, 1], got {value}")
    if not cfg.data.min_size_train:
        raise SvisError(f"{source}: data.min_size_train must list at least one size")
    if cfg.teacher.mode == "frozen" and not cfg.teacher.checkpoint:
        raise SvisError(f"{source}: teacher.mode=frozen needs teacher.checkpoint")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML) and apply ``key=value`` overrides; validate every key and type."""
    data: dict[str, Any] = {}
    source = str(path) if path else "config"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise SvisError(f"{path}: cannot read config: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise SvisError(f"{path}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
    data = _merge(data, parse_overrides(overrides or []))
    return check_config(_build(Config, data, "", source), source)


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Rebuild a ``Config`` from ``Config.to_dict()`` output (e.g. inside a Ray worker)."""
    return _build(Config, data, "", source)


def save_config(cfg: Config, path: str | Path) -> None:
    from svis_ray.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its existing local paths made absolute.

    Ray Train workers and Tune trials do not run in the launch folder (and may run on another
    node), so a path relative to where the user typed the command would not resolve there.
    URIs and paths that do not exist here are left as given (their error names them as typed).
    """

    def absolute(p: str | None) -> str | None:
        if not p or "://" in p or Path(p).is_absolute() or not Path(p).expanduser().exists():
            return p
        return str(Path(p).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=absolute(cfg.data.root)),
        model=dataclasses.replace(cfg.model, weights=absolute(cfg.model.weights)),
        teacher=dataclasses.replace(cfg.teacher, checkpoint=absolute(cfg.teacher.checkpoint)),
    )
