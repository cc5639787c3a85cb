"""Typed run configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every key is checked at start: an unknown key or a value of the wrong type fails with one line
naming the key (``configs/x.yaml: train.max_step: unknown key (did you mean 'max_steps'?)``),
so a typo never silently falls back to a default after an hour on a cluster.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
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
    train_json: str = "train_1frame.json"  # training annotations; relative paths are taken under `root`
    val_json: str = "val.json"  # held-out split, fully annotated, for evaluation; "" = none
    min_size_train: list[int] = field(default_factory=lambda: [360, 480])  # training short sides, one drawn per clip
    max_size_train: int = 1333  # cap on the training long side in pixels
    min_size_test: int = 360  # short side at evaluation; stored in the checkpoint as `predict`'s default
    max_size_test: int = 1333  # cap on the long side at evaluation and prediction
    flip: bool = True  # random horizontal flip of training clips (masks follow)
    unlabelled_per_clip: int = 2  # unlabelled frames per clip besides its labelled one (Sparse-MinVIS: 2)
    unlabelled_max_gap: int = 0  # unlabelled frames within this many frames of the labelled one; 0 = any
    clips_per_step: int = 2  # clips per worker and step (a clip = the frames of one video)
    on_bad_frame: Literal["fail", "skip"] = "fail"  # bad frame: fail = stop naming it, skip = drop it (bad_frames)
    decode_cpus: float = 0.25  # logical CPUs per decode task (small: Train holds whole CPUs)
    decode_tasks: int = 8  # decode tasks in flight at most (each is a process; match the node's cores)


@dataclass
class ModelSection:
    preset: Literal["tiny", "minvis_r50"] = "tiny"  # architecture: tiny (CPU, demo) or minvis_r50
    weights: str | None = None  # initial weights: ResNet / Mask2Former .pkl / MinVIS .pth / svis-ray .pt (path or URI)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. {num_queries: 50}


@dataclass
class LossConfig:
    class_weight: float = 2.0  # weight of the classification loss and matching cost
    mask_weight: float = 5.0  # weight of the mask binary cross-entropy loss and matching cost
    dice_weight: float = 5.0  # weight of the mask dice loss and matching cost
    eos_coef: float = 0.1  # cross-entropy weight of the no-object class
    num_points: int = 12544  # points sampled per mask for the mask losses and matching (Mask2Former: 112 x 112)
    oversample_ratio: float = 3.0  # random candidates per sampled point, from which the uncertain ones are picked
    importance_sample_ratio: float = 0.75  # share of the sampled points taken where the prediction is most uncertain


@dataclass
class TrainConfig:
    max_steps: int = 6000  # optimizer steps of the run
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.05  # AdamW weight decay (none on norm layers and embeddings)
    backbone_multiplier: float = 0.1  # learning-rate factor of the backbone
    clip_norm: float = 0.01  # full-model gradient clipping at this L2 norm
    warmup_steps: int = 10  # learning-rate warm-up steps (MinVIS's warm-up factor is 1, so the rate stays flat)
    milestones: list[int] = field(default_factory=lambda: [4000])  # steps where the lr is multiplied by gamma
    gamma: float = 0.1  # learning-rate factor at each milestone
    # Numerics on CUDA (svis_ray/accel.py): fp32; tf32 = TF32 matmuls; bf16 = bf16 autocast over TF32
    # (deformable sampling, losses and matching in fp32); fp16 = MinVIS's AMP (+ GradScaler). CPU: fp32.
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = "bf16"
    # torch.compile the per-frame model; frames are padded to multiples of compile_size_multiple so
    # that few shapes compile (the compiled_shapes metric counts them). Compiling takes minutes.
    compile: bool = False
    compile_size_multiple: int = 128  # padding multiple of a step's frames when train.compile is on (>= 32, /32)
    num_workers: int = 1  # Ray Train workers, one student replica each (DDP)
    use_gpu: bool = False  # one GPU per train worker (NCCL); false = CPU workers (gloo)
    cpus_per_worker: float = 1.0  # logical CPUs Ray reserves per train worker
    # A custom resource each train worker also asks 1 of: cluster.yaml's student node type
    # advertises it (student_node), so workers land only there; empty = none (one machine)
    node_resource: str = ""
    checkpoint_every: int = 500  # steps between checkpoints (the last step is always checkpointed)
    num_to_keep: int = 2  # checkpoints kept in the run folder, ranked by held-out AP
    max_failures: int = 3  # worker-group restarts after a lost worker or node (a user error is never retried)
    # held-out evaluation at checkpoints every K steps, in a Ray task off the training workers
    # (its val_AP is reported a few steps later); the last step is evaluated by rank 0; 0 = only at the end
    eval_every: int = 500
    # what that evaluation task holds (CPU, GPU, custom resources), e.g. {CPU: 4, GPU: 1} on a cluster
    eval_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    log_every: int = 10  # steps between metric reports (each waits up to ~2 s for the Train controller)
    seed: int = 0  # seed of the clip schedule, augmentation and initialisation
    torch_threads: int = 0  # intra-op threads per worker on CPU; 0 = torch default


@dataclass
class TeacherConfig:
    mode: Literal["ema", "frozen", "online"] = "ema"  # ema: mean teacher; frozen: checkpoint; online: Sparse-MinVIS
    num_teachers: int = 1  # teacher actors in the Ray Data pool
    gpus_per_teacher: float = 1.0  # fractional values share a GPU; 0 = CPU teachers
    checkpoint: str | None = None  # frozen mode: the fixed teacher weights (path or URI)
    ema_momentum: float = 0.999  # EMA momentum of the teacher, ramped as min(momentum, 1 - 1/step)
    publish_every: int = 50  # rank 0 publishes the EMA weights every K steps
    warmup_steps: int = 0  # pseudo-labels are ignored (weight 0) before this step
    batch_size: int = 2  # clips per teacher call
    # A custom resource each teacher actor also asks 1 of: cluster.yaml's teacher node type
    # advertises it (teacher_node), so teachers never take a student node's GPU; empty = none
    node_resource: str = ""
    window: int = 30  # frames per teacher forward chunk (the frames of all clips of a teacher call, batched)
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = "bf16"  # teacher inference numerics on CUDA (as train.precision)
    compile: bool = False  # torch.compile the teachers' model (frames padded to multiples of 128)
    # Object store the training stream may fill ahead of the student: bounds memory and how far
    # fast teachers run ahead with old weights (the teacher_lag metric).
    max_buffer_mb: int = 1024


@dataclass
class PseudoConfig:
    topk: int = 10  # (query, class) candidates per frame, best scores first
    score_threshold: float = 0.8  # class score an unanchored pseudo-label needs (Sparse-MinVIS: 0.8)
    mask_threshold: float = 0.0  # mask logit above which a pixel is foreground
    min_area: int = 16  # smallest pseudo-label mask kept, in pixels at training resolution
    nms_iou: float = 1.0  # class-agnostic mask NMS per frame (anchored first, then by score) at this IoU; 1 = off
    # grabcut: snap each kept mask to the frame's colour edges (OpenCV GrabCut seeded by the mask);
    # on a CPU ~20 ms a mask at 96x128, ~170 ms at 360x640. none: the teacher's masks as they are.
    refine: Literal["none", "grabcut"] = "none"
    keep_empty: bool = True  # frames with nothing kept still train as background
    anchor: bool = True  # tracks overlapping a labelled-frame instance take its class
    anchor_iou: float = 0.5  # mask IoU with a labelled-frame instance that anchors a track
    anchor_score_threshold: float = 0.3  # anchored tracks pass at this lower foreground score
    weight: float = 1.0  # lambda_pseudo: loss weight of pseudo-labelled frames (ground truth: 1)
    # No-object weight (x lambda) of the queries a pseudo-labelled frame leaves unmatched: 1 trains
    # what the teacher did not keep as background (Sparse-MinVIS); lower trains missed objects less so.
    background_weight: float = 1.0
    ramp_steps: int = 0  # lambda_pseudo ramps linearly from 0 over the N steps after teacher.warmup_steps
    # Colour jitter, greyscale or blur on the student's copy of each teacher-labelled frame, which
    # the teacher saw clean (Unbiased Teacher's photometric strong augmentation; no geometry).
    strong_aug: bool = False
    store: Literal["none", "parquet"] = "none"  # parquet = also write every pseudo-label to <run>/pseudo_labels/
    # Per-clip reliability check against the clip's labelled frame: the teacher's own confident
    # predictions there (the unanchored filter) are matched to its ground truth (Hungarian, same
    # class); reliability = summed matched mask IoU / max(ground-truth objects, predictions), 1 for
    # an empty frame predicted empty. off: not computed; drop: a clip under reliability_min gives
    # its unlabelled frames loss weight 0 (not even background); weight: their weight x reliability.
    # Default off: not yet measured in training on either demo family (docs/experiments.md).
    reliability: Literal["off", "drop", "weight"] = "off"
    reliability_min: float = 0.5  # drop: the reliability a clip needs for its pseudo-labels to count


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
    dir: str = "runs/debug"  # run folder (path or URI): checkpoints, logs, results.json, metrics.json, best.pt
    progress_bar: bool = False  # draw a bar in the console progress lines


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)  # dataset, clips and decoding
    model: ModelSection = field(default_factory=ModelSection)  # architecture and initial weights
    loss: LossConfig = field(default_factory=LossConfig)  # Mask2Former set-prediction loss
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, workers, checkpoints, evaluation
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the teachers that pseudo-label unlabelled frames
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)  # which pseudo-labels train the student, and how much
    inference: InferenceConfig = field(default_factory=InferenceConfig)  # how frames are linked into tracks
    output: OutputConfig = field(default_factory=OutputConfig)  # run folder and console

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
            "pseudo.background_weight": p.background_weight, "teacher.ema_momentum": cfg.teacher.ema_momentum,
            "pseudo.reliability_min": p.reliability_min}
    for key, value in unit.items():
        if not 0.0 <= value <= 1.0:
            raise SvisError(f"{source}: {key} must lie in [0, 1], got {value}")
    if t.compile_size_multiple < 32 or t.compile_size_multiple % 32:
        raise SvisError(f"{source}: train.compile_size_multiple must be a multiple of 32, got {t.compile_size_multiple}")
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
    from svis_ray.io import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # a local path or a URI


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


# ----------------------------------------------------------------------------- reference
REFERENCE_COMMAND = "svis-ray config --reference > docs/config.md"


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in ``cls``'s source: the comment lines right
    above the field, then the comment after it on its own line."""
    src = textwrap.dedent(inspect.getsource(cls))
    lines = src.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(src).readline)
    trailing = {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(src).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].lstrip().startswith("#"):
            above.insert(0, lines[i])
            i -= 1
        texts = [c.strip().lstrip("#").strip() for c in [*above, trailing.get(node.end_lineno, "")]]
        out[node.target.id] = " ".join(t for t in texts if t)
    return out


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_type_text(a) for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _reference_rows(obj: Any, prefix: str) -> list[str]:
    """Markdown: a table of ``obj``'s plain fields, then a section per dataclass field."""
    cls = type(obj)
    hints, docs = typing.get_type_hints(cls), field_comments(cls)
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sections += ["", f"### `{key}`: {docs.get(f.name, '')}", "", *_reference_rows(value, key + ".")]
            continue
        default = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
        text = (docs.get(f.name) or "(undocumented)").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_text(hints[f.name])} | `{default}` | {text} |")
    table = ["| key | type | default | meaning |", "|---|---|---|---|", *rows] if rows else []
    return table + sections


def reference_markdown() -> str:
    """docs/config.md: every key of the training and sweep configs with type, default and meaning,
    taken from the dataclasses and their field comments."""
    from svis_ray.tuning import SweepConfig

    return "\n".join([
        "# Configuration reference", "",
        f"Generated from the dataclasses in `svis_ray/config.py` and `svis_ray/tuning.py` by `{REFERENCE_COMMAND}`;",
        "edit the field comments there, not this file. `svis-ray config --config X [key=value ...]` prints",
        "a config as it resolves. Any key can be set as `section.key=value` after a command's other arguments.", "",
        "## Training config (`svis-ray train`, `svis-ray demo`, `svis-ray pseudo-quality`)",
        *_reference_rows(Config(), ""), "",
        "## Sweep config (`svis-ray tune`)", "",
        *_reference_rows(SweepConfig(), ""), ""])
