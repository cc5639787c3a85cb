"""Semi-supervised training: a Ray Train ``TorchTrainer`` student fed by a Ray Data stream
of clips that a teacher actor pool pseudo-labels concurrently.

    driver:   [one-shot parse task] -> split index (object store, shared by reference)
    stream:   clip schedule (range -> clip rows) -> [decode tasks] -> [teacher actor pool] -> shards
    workers:  train_loop_per_worker: MinVIS student (DDP), EMA teacher published to WeightStore
    controller callback: CSV + TensorBoard + console progress in the run folder

Resuming: re-running with the same ``output.dir`` continues from the last checkpoint (Ray Train
finds the run snapshot by name); a worker failure restarts the worker group from it
(``FailureConfig(max_failures)``). The clip schedule is deterministic, so a restart skips the
clips the checkpoint has already trained on.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy

from svis_ray import io as svis_io
from svis_ray.accel import channels_last, compiled_shapes, effective_precision, maybe_compile, set_matmul_precision
from svis_ray.config import Config, absolute_paths, check_config, config_from_dict
from svis_ray.console import console_line, log_file_for, route_worker_output, with_log
from svis_ray.errors import SvisError
from svis_ray.pictures import render_eval_picture, write_png

if TYPE_CHECKING:
    from svis_ray.data.ingest import SharedSplit

log = logging.getLogger("svis_ray")

PROGRESS_FILE = "progress.json"  # last checkpointed step, read by the dataset factory on restart
EVAL_PICTURE = "eval.png"  # in an evaluated checkpoint: its tracks picture, shown in TensorBoard


# ----------------------------------------------------------------------------- pure helpers
def pseudo_weight(step: int, cfg: Config) -> float:
    """lambda_pseudo at ``step``: 0 during teacher warm-up, then a linear ramp to ``pseudo.weight``."""
    s = step - cfg.teacher.warmup_steps
    if s < 0:
        return 0.0
    if cfg.pseudo.ramp_steps <= 0:
        return cfg.pseudo.weight
    return cfg.pseudo.weight * min(1.0, (s + 1) / cfg.pseudo.ramp_steps)


def ema_momentum(step: int, momentum: float) -> float:
    """EMA momentum after ``step`` updates: ``min(momentum, 1 - 1/step)`` (Mean Teacher's ramp).

    A constant 0.99 from step 1 keeps 0.99**60 = 55 % of the *random initial* weights in the
    teacher after 60 steps; the ramp makes the EMA the plain average of the steps so far until
    the momentum takes over, so an early teacher is a (smoothed) copy of the student."""
    return min(momentum, 1.0 - 1.0 / max(step, 1))


def worker_device() -> torch.device:
    """The worker's GPU when CUDA really exists, else the CPU (fake GPU slots in tests)."""
    if torch.cuda.is_available():
        dev = ray.train.torch.get_device()
        return dev[0] if isinstance(dev, list) else dev
    return torch.device("cpu")


def run_dir(cfg: Config) -> str:
    """The run folder: an absolute local path, or a URI (``s3://bucket/runs/x``) kept as given."""
    return svis_io.absolute(cfg.output.dir)


def num_clips(cfg: Config, world_size: int) -> int:
    return cfg.train.max_steps * world_size * cfg.data.clips_per_step


# ----------------------------------------------------------------------------- the worker loop
def _online_targets(outputs: dict[str, torch.Tensor], targets: list[dict], cfg: Config,
                    images: torch.Tensor) -> list[dict]:
    """Sparse-MinVIS: the student labels its own unlabelled frames from this very forward pass.
    images: uint8 [N,3,H,W], the padded frames (for ``pseudo.refine``)."""
    from svis_ray.pseudo import select_frame

    logits, masks = outputs["pred_logits"].detach(), outputs["pred_masks"].detach()
    hp, wp = masks.shape[-2] * 4, masks.shape[-1] * 4
    for i, t in enumerate(targets):
        if t["labels"] is not None:
            continue
        full = torch.nn.functional.interpolate(masks[i:i + 1].float(), size=(hp, wp), mode="bilinear",
                                               align_corners=False)[0]
        h, w = t["size"]
        full[:, h:, :] = -1e4  # padding is never foreground
        full[:, :, w:] = -1e4
        fp = select_frame(logits[i], full, cfg.pseudo, image=images[i].permute(1, 2, 0).numpy())  # a view
        t["labels"] = torch.from_numpy(fp.labels).to(logits.device)
        t["masks"] = torch.from_numpy(fp.masks).to(logits.device)
        t["scores"], t["candidates"] = fp.scores, fp.candidates
    return targets


class _Window:
    """Running sums of per-step metrics between two reports."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.frames = 0
        self.t0 = time.perf_counter()
        self.start = time.time()  # wall clock, comparable with the teachers' teacher_time

    def add(self, values: dict[str, float | torch.Tensor], frames: int) -> None:
        """Device tensors (the step's losses) are summed on the device: no host sync per step."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v if isinstance(v, torch.Tensor) else float(v))
        self.steps += 1
        self.frames += frames

    def means(self) -> dict[str, float]:
        names = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        if names:  # one device->host copy for the whole window
            values = torch.stack([self.sums[k].float() for k in names]).tolist()
            self.sums.update(zip(names, values))
        out = {k: v / max(1, self.steps) for k, v in self.sums.items()}
        out["frames_per_s"] = self.frames / max(1e-9, time.perf_counter() - self.t0)
        out["window_start"] = self.start
        return out


def quiet_report_log() -> None:
    """Ray Train logs every ``ray.train.report`` of every worker at INFO (the whole metrics dict);
    the controller's progress line already shows them, so keep the console readable."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # Ray names it by file


@dataclass
class TrainState:
    """What a checkpoint holds and a restart restores: the student, its optimiser, schedule and
    loss scaler, the EMA teacher (rank 0; None when there is none), the step and the best held-out AP."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    ema: torch.nn.Module | None = None
    step: int = 0
    best_ap: float = -1.0

    @property
    def final(self) -> torch.nn.Module:
        """The run's model (Mean Teacher): the EMA teacher when there is one, else the student.
        It is what gets evaluated and what model.pt -- and so best.pt -- holds."""
        return self.ema if self.ema is not None else self.model


def build_state(cfg: Config, num_classes: int, device: torch.device) -> TrainState:
    """A fresh student (with ``model.weights``) and its optimiser, learning-rate schedule and scaler."""
    from svis_ray.model import build_model, load_pretrained
    from svis_ray.optim import build_optimizer, build_scheduler

    model = build_model(cfg.model.preset, num_classes, **cfg.model.overrides)
    if cfg.model.weights:
        load_pretrained(model, cfg.model.weights)
    channels_last(model.to(device), device)
    set_matmul_precision(effective_precision(cfg.train.precision, device))
    optimizer = build_optimizer(model, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                backbone_multiplier=cfg.train.backbone_multiplier)
    scheduler = build_scheduler(optimizer, cfg.train.max_steps, warmup_steps=cfg.train.warmup_steps,
                                milestones=tuple(cfg.train.milestones), gamma=cfg.train.gamma)
    fp16 = effective_precision(cfg.train.precision, device) == "fp16"
    return TrainState(model, optimizer, scheduler, torch.amp.GradScaler("cuda") if fp16 else None)


def build_criterion(cfg: Config, num_classes: int, device: torch.device):
    """MinVIS's set criterion (Hungarian matching; class, mask BCE and dice losses)."""
    from svis_ray.losses import SetCriterion
    from svis_ray.matcher import HungarianMatcher

    L = cfg.loss
    matcher = HungarianMatcher(L.class_weight, L.mask_weight, L.dice_weight, L.num_points)
    return SetCriterion(num_classes, matcher,
                        weight_dict={"loss_ce": L.class_weight, "loss_mask": L.mask_weight,
                                     "loss_dice": L.dice_weight},
                        eos_coef=L.eos_coef, num_points=L.num_points, oversample_ratio=L.oversample_ratio,
                        importance_sample_ratio=L.importance_sample_ratio).to(device)


def restore(state: TrainState, ckpt: Checkpoint | None, device: torch.device) -> None:
    """Load the last checkpoint of this run into ``state`` (nothing on a fresh start).

    model.pt holds the run's model (the EMA teacher when there is one), train_state.pt the
    optimiser, schedule, step, best AP and -- with an EMA -- the student."""
    from svis_ray.model import load_pretrained

    if not ckpt:
        return
    with ckpt.as_directory() as d:
        load_pretrained(state.model, os.path.join(d, "model.pt"))
        saved = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=True)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step, state.best_ap = int(saved["step"]), float(saved["best_ap"])
    if saved.get("student") is not None:  # model.pt held the EMA teacher
        state.ema = copy.deepcopy(state.model)
        state.model.load_state_dict(saved["student"])
    elif saved.get("ema") is not None:  # written before model.pt held the EMA
        state.ema = copy.deepcopy(state.model)
        state.ema.load_state_dict(saved["ema"])


class WeightPublisher:
    """Rank 0's side of the ``WeightStore``: publishing never blocks the step.

    A put is fired and left in flight (its 176 MB state dict goes to the object store while
    training goes on); at most one call is in flight, and a publish that falls due meanwhile goes
    out as soon as it finishes, with the weights of that later step. While no publish is due, a
    cheap ``held()`` probe stays in flight, so a store that Ray restarted empty is noticed within
    a step or two and gets the current weights again. Steps stop when no data comes -- the teachers
    wait for weights a store that died before they got any no longer has -- so a watchdog thread
    also probes every ``check_s`` seconds and puts the last published weights (kept as an object
    ref, no second host copy) into an empty store. ``attempt``: this worker group's start, set in
    the store by the dataset factory."""

    def __init__(self, store, attempt: int, check_s: float = 2.0) -> None:
        self.store, self.attempt = store, attempt
        self.inflight: ray.ObjectRef | None = None
        self.due = False
        self.sent = -1  # step of the weights last handed to the store
        self.last: tuple[int, ray.ObjectRef] | None = None  # (step, weights) of the last put
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watchdog, args=(check_s,), daemon=True,
                                       name="weight-store-watchdog")
        self._watch.start()

    def _watchdog(self, check_s: float) -> None:
        while not self._stop.wait(check_s):
            last = self.last
            if last is None:
                continue
            try:
                if ray.get(self.store.held.remote(), timeout=max(10.0, check_s)) == (None, -1):
                    # restarted empty; a newer put racing this one wins in the store (step order)
                    ray.get(self.store.put.remote(self.attempt, last[0], last[1]), timeout=300)
            except Exception:  # restarting (the next round tries again), or gone with the run
                if not ray.is_initialized():
                    return

    def close(self) -> None:
        self._stop.set()

    def publish(self, ema: torch.nn.Module, step: int) -> None:
        self.due = True
        self.poll(ema, step)

    def poll(self, ema: torch.nn.Module, step: int) -> None:
        """Returns at once: sends what is due if nothing is in flight, else checks on the call."""
        if self.inflight is not None:
            ready, _ = ray.wait([self.inflight], timeout=0)
            if not ready:
                return
            try:
                held = ray.get(ready[0])
            except ray.exceptions.RayError:  # the store died with the call in it: publish again
                held = None
            self.inflight = None
            if self.sent >= 0 and held != (self.attempt, self.sent):
                self.due = True  # the store restarted and lost the weights
        if self.due:
            state = ray.put({k: v.detach().to("cpu", copy=True) for k, v in ema.state_dict().items()})
            self.inflight = self.store.put.remote(self.attempt, step, state)  # the store gets the dict
            self.sent, self.due, self.last = step, False, (step, state)
        else:
            self.inflight = self.store.held.remote()


class EmaTeacher:
    """The Mean Teacher: an exponential moving average of the student (rank 0 only), published
    every ``teacher.publish_every`` steps for the teacher actor pool (``publisher``; None: kept
    only as the run's model)."""

    def __init__(self, state: TrainState, cfg: Config, publisher: WeightPublisher | None) -> None:
        if state.ema is None:
            state.ema = copy.deepcopy(state.model)
        self.ema = state.ema.eval().requires_grad_(False)
        self.momentum = cfg.teacher.ema_momentum
        self.publish_every = cfg.teacher.publish_every
        self.publisher = publisher

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold the student's weights after ``step`` optimiser steps into the average."""
        m = ema_momentum(step, self.momentum)
        for pe, ps in zip(self.ema.state_dict().values(), model.state_dict().values()):
            if pe.dtype.is_floating_point:
                pe.mul_(m).add_(ps.detach(), alpha=1 - m)
            else:
                pe.copy_(ps)

    def publish(self, step: int) -> None:
        """Hand the weights to the teachers; version = the step they were taken at."""
        if self.publisher is not None:
            self.publisher.publish(self.ema, step)

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        self.update(model, step)
        if step % self.publish_every == 0:
            self.publish(step)
        elif self.publisher is not None:
            self.publisher.poll(self.ema, step)


def connect_publisher(loop_config: dict[str, Any]) -> WeightPublisher:
    """Rank 0's publisher for the store named in ``loop_config``, under the attempt the dataset
    factory has just set there (Train calls the factory before it starts the train function)."""
    store = ray.get_actor(loop_config["store_name"], namespace=loop_config["namespace"])
    attempt = ray.get(store.current_attempt.remote())
    if attempt is None:  # the store restarted between the factory and now: restart the worker group
        raise RuntimeError(f"weight store {loop_config['store_name']} lost this attempt's id; restarting")
    return WeightPublisher(store, attempt)


def pseudo_weights(targets: list[dict], step: int, cfg: Config, device: torch.device) -> float:
    """Set each frame's loss weights (pseudo-labelled frames: lambda_pseudo x reliability, their
    unmatched queries ``pseudo.background_weight``) and move its labels to ``device``; returns lambda."""
    lam = pseudo_weight(step, cfg)
    for t in targets:
        # pseudo.reliability scales a teacher-labelled frame's whole loss (background too)
        t["weight"] = lam * t.get("reliability", 1.0) if t["pseudo"] else 1.0
        t["bg_weight"] = cfg.pseudo.background_weight if t["pseudo"] else 1.0
        if t["labels"] is not None:
            t["labels"], t["masks"] = t["labels"].to(device), t["masks"].to(device)
    return lam


def student_step(student: torch.nn.Module, criterion, state: TrainState, images: torch.Tensor,
                 targets: list[dict], stats: dict[str, Any], cfg: Config, device: torch.device
                 ) -> dict[str, float]:
    """One optimiser step of the student on a batch from the stream; returns the step's metrics.

    images: uint8 [N,3,H,W] padded frames; targets: N frame dicts (``ClipCollate``); stats: the
    batch's stream statistics (teacher versions, candidates, bad frames)."""
    from svis_ray.model import preprocess
    from svis_ray.optim import train_step
    from svis_ray.pseudo import strong_augment

    lam = pseudo_weights(targets, state.step, cfg, device)
    if cfg.teacher.mode == "online":  # the student labels its unlabelled frames from this forward
        frames = images  # the clean frames: strong_aug below rebinds `images` before the lambda runs
        targets_or_fn = lambda outputs: _online_targets(outputs, targets, cfg, frames)  # noqa: E731
    else:
        targets_or_fn = targets
    if cfg.pseudo.strong_aug:
        images = strong_augment(images, targets)
    x = preprocess(images.to(device), [t["size"] for t in targets])  # normalise, then zero the padding
    parts = train_step(student, criterion, state.optimizer, state.scheduler, x, targets_or_fn,
                       scaler=state.scaler, clip_norm=cfg.train.clip_norm,
                       precision=effective_precision(cfg.train.precision, device))
    pseudo = [t for t in targets if t["pseudo"] and "scores" in t]  # teacher- or self-labelled
    kept = sum(len(t["labels"]) for t in pseudo)
    cands = (sum(t["candidates"] for t in pseudo) if cfg.teacher.mode == "online"
             else stats.get("pseudo_candidates", 0.0))
    return {**parts, "lambda_pseudo": lam, "compiled_shapes": compiled_shapes(student), "pseudo_per_frame": kept / max(1, len(pseudo)),
            "acceptance": kept / cands if cands else 0.0, "bad_frames": stats["bad_frames"],
            # steps the teacher's weights were behind the student when it labelled this batch
            "teacher_lag": (state.step - stats["teacher_version_min"]) if "teacher_version_min" in stats
            else 0.0}


def evaluate_into(model: torch.nn.Module, val, cfg: Config, step: int, d: str) -> dict[str, float]:
    """Held-out evaluation of ``model`` (the ``val`` split) into folder ``d`` (results.json,
    metrics.json, eval.png); returns the ``val_*`` metrics."""
    from svis_ray.inference import evaluate_split

    val_metrics, records = evaluate_split(model, val, cfg.data.root, cfg.data.min_size_test,
                                          cfg.data.max_size_test, window=cfg.inference.window,
                                          topk=cfg.inference.topk, tracker=cfg.inference.tracker)
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(records, f)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump({**val_metrics, "step": step, "tracker": cfg.inference.tracker}, f, indent=1)
    write_png(os.path.join(d, EVAL_PICTURE), render_eval_picture(val, cfg.data.root, records))
    return {f"val_{k}": v for k, v in val_metrics.items() if k != "per_category"}


def validate_checkpoint(checkpoint: Checkpoint, config: dict[str, Any]) -> dict[str, float]:
    """Ray Train's validation task (``train.eval_resources``): the held-out evaluation of a
    checkpoint's model, off the training workers. Writes results.json, metrics.json and eval.png
    into the checkpoint; the returned ``val_*`` metrics join the checkpoint's (so ``val_AP`` ranks
    it for ``num_to_keep`` and best.pt), and rank 0 reports them at a later step (``Reporter``)."""
    import pyarrow.fs

    from svis_ray.data.ingest import load_split
    from svis_ray.model import load_checkpoint

    cfg = config_from_dict(config)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    device = torch.device("cuda") if torch.cuda.is_available() and ray.get_gpu_ids() else torch.device("cpu")
    with checkpoint.as_directory() as d:
        model, info = load_checkpoint(os.path.join(d, "model.pt"), device=device)
    val = load_split(cfg.data.root, cfg.data.val_json)
    with tempfile.TemporaryDirectory() as d:
        metrics = evaluate_into(model, val, cfg, int(info["extra"]["step"]), d)
        pyarrow.fs.copy_files(d, checkpoint.path, destination_filesystem=checkpoint.filesystem)
    return metrics


def validation_config(cfg: Config) -> "ray.train.v2.api.validation_config.ValidationConfig | None":
    """The trainer's validation hook when there are periodic held-out evaluations, else None."""
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    if not (cfg.data.val_json and cfg.train.eval_every > 0):
        return None
    r = dict(cfg.train.eval_resources)
    remote = {"num_cpus": r.pop("CPU", 1), "num_gpus": r.pop("GPU", 0), "resources": r,
              "max_retries": 0,  # a bad split or checkpoint is not fixed by retrying
              # Under Tune the controller lives in the trial's placement group, which captures child
              # tasks: without this the task waits forever for a CPU of the trial driver's bundle
              "scheduling_strategy": "DEFAULT"}
    return ValidationConfig(validate_checkpoint, task_config=ValidationTaskConfig(fn_kwargs={"config": cfg.to_dict()}),
                            ray_remote_kwargs=remote)


class Reporter:
    """Reports to Ray Train: window means every ``train.log_every`` steps (with the schedule
    indices of the clips trained, ``clip_index``); at checkpoints rank 0 writes the checkpoint
    (model.pt, train_state.pt).

    Held-out evaluation (``train.eval_every``) is off the training barrier: the checkpoint is
    reported with ``validation=True`` and Ray Train's validation task evaluates it
    (``validate_checkpoint``) while all ranks keep training. Rank 0 picks the results up at a
    later report (``val_AP`` etc. lag by at least one report; ``val_step`` says which checkpoint
    they belong to; ``val_pictures`` names the pictures for TensorBoard). The last step is
    evaluated in place, after the earlier evaluations finished, so the run's last report carries
    its final held-out AP (nothing is left to train then).

    Every rank calls ``ray.train.report`` at the same steps (it is a barrier)."""

    def __init__(self, cfg: Config, rank: int, class_names: list[str]) -> None:
        from svis_ray.data.ingest import load_split

        self.cfg, self.rank, self.class_names = cfg, rank, class_names
        self.val = load_split(cfg.data.root, cfg.data.val_json) if rank == 0 and cfg.data.val_json else None
        self.window = _Window()
        self.last: dict[str, Any] = {}
        self.clips: list[int] = []  # schedule indices of the clips trained since the last report
        self.pending = 0  # checkpoints handed to the validation task whose results rank 0 has not seen
        self.seen: set[str] = set()

    def add(self, metrics: dict[str, float], frames: int, step_start: float, step: int,
            stats: dict[str, Any]) -> None:
        self.window.add(metrics, frames=frames)
        self.clips += stats.get("clip_index", [])
        self.last.update(step=step, time=time.time(), step_start=step_start,
                         teacher_time_max=stats.get("teacher_time_max", float("nan")),
                         teacher_time_min=stats.get("teacher_time_min", float("nan")))

    def after_step(self, state: TrainState) -> None:
        cfg, step = self.cfg, state.step
        do_ckpt = step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
        if not (do_ckpt or step % cfg.train.log_every == 0):
            return
        # val_step: the checkpoint whose held-out evaluation this report brings; -1: none new (val_AP
        # is then the best so far)
        metrics = {**self.window.means(), **self.last, "val_AP": state.best_ap, "val_step": -1,
                   "clip_index": self.clips}
        self.window, self.clips = _Window(), []
        if self.rank != 0:
            ray.train.report(metrics)
            return
        final = step == cfg.train.max_steps
        evaluate = self.val is not None and (final or (cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0))
        metrics.update(self.validated(state, wait=final and evaluate))
        if not do_ckpt:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            if evaluate and final:
                metrics.update(evaluate_into(state.final, self.val, cfg, step, d), val_step=step)
                state.best_ap = max(state.best_ap, metrics["val_AP"])
            self.write_checkpoint(state, d, metrics["val_AP"])
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), validation=evaluate and not final)
        if evaluate and not final:
            self.pending += 1

    def validated(self, state: TrainState, wait: bool = False) -> dict[str, Any]:
        """The results of validation tasks finished since the last call (the latest one's val_*
        metrics, its ``val_step``, every new picture); ``wait``: until all have finished."""
        from ray.train import CheckpointConsistencyMode
        from ray.train.v2.api.reported_checkpoint import ReportedCheckpointStatus as Status

        if not self.pending:
            return {}
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=CheckpointConsistencyMode.VALIDATED if wait else CheckpointConsistencyMode.COMMITTED,
            timeout_s=None if wait else 0.01)  # not waiting: what the controller knows now
        done = sorted((r for r in reported if r.checkpoint.path not in self.seen and r.status in (
            Status.VALIDATED, Status.VALIDATION_FAILED, Status.VALIDATION_TIMEOUT)),
            key=lambda r: r.metrics["step"])
        self.pending = 0 if wait else max(0, self.pending - len(done))
        out: dict[str, Any] = {}
        for r in done:
            self.seen.add(r.checkpoint.path)
            if r.status == Status.VALIDATED:
                state.best_ap = max(state.best_ap, r.metrics["val_AP"])
                out.update({k: v for k, v in r.metrics.items()
                            if k.startswith("val_") and k not in ("val_step", "val_pictures")})
                out["val_step"] = r.metrics["step"]
                out.setdefault("val_pictures", []).append([r.metrics["step"], r.checkpoint.path])
        return out

    def write_checkpoint(self, state: TrainState, d: str, val_ap: float) -> None:
        """model.pt (the run's model, what predict and best.pt use) and train_state.pt (the rest
        of what a restart needs: optimiser, schedule, step, best AP, the student under an EMA)."""
        from svis_ray.model import save_checkpoint

        cfg = self.cfg
        save_checkpoint(os.path.join(d, "model.pt"), state.final, self.class_names,
                        extra={"step": state.step, "val_AP": val_ap,
                               "min_size_test": cfg.data.min_size_test, "max_size_test": cfg.data.max_size_test,
                               # what produced results.json; predict's default
                               "tracker": cfg.inference.tracker, "topk": cfg.inference.topk})
        torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                    "step": state.step, "best_ap": state.best_ap,
                    "student": state.model.state_dict() if state.final is not state.model else None},
                   os.path.join(d, "train_state.pt"))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every ``TorchTrainer`` worker: restore, then per batch a student step, the EMA
    teacher's update/publish and the report (a checkpoint every ``train.checkpoint_every``)."""
    from svis_ray.data.collate import ClipCollate

    cfg = config_from_dict(loop_config["config"])
    class_names: list[str] = loop_config["class_names"]
    store_name: str | None = loop_config["store_name"]
    rank = ray.train.get_context().get_world_rank()
    quiet_report_log()
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    device = worker_device()

    # 1. restore: a fresh student, or the last checkpoint of this run
    state = build_state(cfg, len(class_names), device)
    criterion = build_criterion(cfg, len(class_names), device)
    restore(state, ray.train.get_checkpoint(), device)
    if rank != 0:
        state.ema = None  # only rank 0 evaluates, checkpoints and publishes the teacher
    teacher = None
    if state.ema is not None or (rank == 0 and cfg.teacher.mode == "ema"):
        publish = rank == 0 and store_name and cfg.teacher.mode == "ema"
        teacher = EmaTeacher(state, cfg, connect_publisher(loop_config) if publish else None)
        teacher.publish(state.step)  # teachers wait for this first version
    # Every parameter gets a gradient (tests/test_speed.py), so DDP need not search for unused ones;
    # gradients live in the all-reduce buckets (no copy in and out)
    student = maybe_compile(ray.train.torch.prepare_model(
        state.model, move_to_device=device,
        parallel_strategy_kwargs={"gradient_as_bucket_view": True, "find_unused_parameters": False}), cfg.train.compile)
    reporter = Reporter(cfg, rank, class_names)

    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=cfg.data.clips_per_step, prefetch_batches=1,
        collate_fn=ClipCollate(cfg.train.compile_size_multiple if cfg.train.compile else 32))
    for images, targets, stats in batches:
        if state.step >= cfg.train.max_steps:
            break
        step_start = time.time()
        # 2. the student's step
        metrics = student_step(student, criterion, state, images, targets, stats, cfg, device)
        state.step += 1
        # 3. the teacher's update and publish
        if teacher is not None:
            teacher.after_step(state.model, state.step)
        # 4. report, checkpoint (and evaluate)
        reporter.add(metrics, len(images), step_start, state.step, stats)
        reporter.after_step(state)
    if teacher is not None and teacher.publisher is not None:
        teacher.publisher.close()


# ----------------------------------------------------------------------------- logging callback
class MetricsLogger(UserCallback):
    """Writes rank-0 metrics to ``metrics.csv`` and TensorBoard, prints progress, records the
    last checkpointed step for the dataset factory. Runs in the Train controller (driver node).

    Everything goes through ``svis_ray.io``, so the run folder may be a URI: ``metrics.csv`` is
    rewritten whole on object stores (no append there), and TensorBoard writes to a local temp
    folder whose event file is uploaded after every flush."""

    def __init__(self, out_dir: str, max_steps: int, progress_bar: bool) -> None:
        self.out_dir = out_dir
        self.max_steps = max_steps
        self.progress_bar = progress_bar
        self.fields: list[str] | None = None
        self.writer = None
        self.csv: svis_io.Appender | None = None
        self.tb: svis_io.MirroredDir | None = None
        self.filesystem = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]
        row = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        if self.csv is None:
            svis_io.makedirs(self.out_dir)
            self.csv = svis_io.Appender(svis_io.join(self.out_dir, "metrics.csv"))
            # a resumed run keeps appending with the original columns
            header = self.csv.existing().split("\n", 1)[0].strip()
            self.fields = header.split(",") if header else sorted(row)
            new = not header
        else:
            new = False
        line = io.StringIO(newline="")
        w = csv.DictWriter(line, fieldnames=self.fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        self.csv.append(line.getvalue())
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = svis_io.MirroredDir(svis_io.join(self.out_dir, "tb"))
            self.writer = SummaryWriter(self.tb.local)
        for k, v in row.items():
            if k not in ("step", "time", "step_start") and not k.startswith("teacher_time"):
                self.writer.add_scalar(k, v, int(m["step"]))
        if checkpoint is not None:
            self.filesystem = checkpoint.filesystem  # the run's storage: earlier checkpoints live there too
        for step, path in m.get("val_pictures", []):  # evaluations that finished since the last report
            add_eval_picture(self.writer, self.filesystem, path, int(step))
        if checkpoint is not None:
            add_eval_picture(self.writer, checkpoint.filesystem, checkpoint.path, int(m["step"]))
        self.writer.flush()
        self.tb.sync()
        if checkpoint is not None:
            svis_io.write_json(svis_io.join(self.out_dir, PROGRESS_FILE), {"step": int(m["step"])})
        step = int(m["step"])
        done = int(30 * step / self.max_steps)
        bar = f"[{'#' * done}{'.' * (30 - done)}] " if self.progress_bar else ""
        ap = f" val_AP {100 * m['val_AP']:.1f}" if m.get("val_AP", -1) >= 0 else ""
        print(console_line(f"{bar}step {step}/{self.max_steps} loss {m.get('loss', float('nan')):.3f} "
                           f"lr {m.get('lr', 0):.2e} {m.get('frames_per_s', 0):.1f} frames/s "
                           f"pseudo/frame {m.get('pseudo_per_frame', 0):.2f} lag {m.get('teacher_lag', 0):.0f}{ap}"),
              flush=True)


def add_eval_picture(writer, filesystem, checkpoint_path: str, step: int) -> None:
    """The evaluation's picture in a checkpoint (ground truth above the predicted tracks, see
    ``render_eval_picture``) -> TensorBoard image ``eval/tracks``; nothing if it has none."""
    try:  # the one file, not the whole checkpoint (which may live on object storage)
        with filesystem.open_input_file(f"{checkpoint_path}/{EVAL_PICTURE}") as f:
            data = f.read()
    except FileNotFoundError:
        return
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    writer.add_image("eval/tracks", img, step, dataformats="HWC")


# ----------------------------------------------------------------------------- the driver
def _read_progress(out_dir: str) -> int:
    """The last checkpointed step recorded in the run folder, 0 for a new run."""
    path = svis_io.join(out_dir, PROGRESS_FILE)
    if not svis_io.exists(path):
        return 0
    try:
        return int(svis_io.read_json(path, "progress file")["step"])
    except (SvisError, TypeError, ValueError, KeyError):
        return 0


def make_dataset_factory(cfg: Config, world_size: int, num_classes: int, store_name: str | None,
                         namespace: str | None, split: SharedSplit | None = None):
    """A zero-arg callable building the training stream; Train calls it at every worker-group
    start, so a restart rebuilds the pipeline from the last checkpointed step.

    ``split``: the training split's shared index (``run_training`` passes the one it built); every
    start streams the schedule from it, nothing is parsed again. None: shared at the first call."""
    from svis_ray.data.ingest import DecodeConfig, decode_clip, schedule_dataset, share_split, throttled
    from svis_ray.teacher import Teacher

    out_dir = run_dir(cfg)
    cfg_dict = cfg.to_dict()
    # Masks in training resolution, as RLE; the frame index is the video's.
    store_dir = svis_io.join(out_dir, "pseudo_labels") if cfg.pseudo.store == "parquet" else None

    def factory():
        nonlocal split
        # A new attempt of the worker group (first start or restart): the store drops the weights
        # of the previous attempt's trajectory before any teacher or train worker of this one runs.
        attempt = None
        if store_name and cfg.teacher.mode == "ema":
            attempt = time.time_ns()
            ray.get(ray.get_actor(store_name, namespace=namespace).reset.remote(attempt))
        if split is None:
            split = share_split(cfg.data.root, cfg.data.train_json)
        per_step = world_size * cfg.data.clips_per_step
        first = _read_progress(out_dir) * per_step
        # One block per step: blocks stay small and arrive roughly in step order. The schedule's
        # rows and their decoding fuse into one task per block (the same resources).
        decode = {"num_cpus": cfg.data.decode_cpus, "compute": ray.data.TaskPoolStrategy(size=cfg.data.decode_tasks)}
        ds = schedule_dataset(split, cfg.data.root, num_clips(cfg, world_size), 1 + cfg.data.unlabelled_per_clip,
                              cfg.train.seed, first_clip=first, max_gap=cfg.data.unlabelled_max_gap,
                              clips_per_block=per_step, **decode)
        dcfg = DecodeConfig(tuple(cfg.data.min_size_train), cfg.data.max_size_train, cfg.data.flip,
                            cfg.data.on_bad_frame, cfg.train.seed)
        ds = ds.map(decode_clip, fn_kwargs={"cfg": dcfg}, **decode)
        if cfg.teacher.mode != "online":
            ds = ds.map_batches(Teacher, batch_size=cfg.teacher.batch_size, batch_format="numpy",
                                fn_constructor_kwargs={"config": cfg_dict, "num_classes": num_classes,
                                                       "store_name": store_name, "namespace": namespace,
                                                       "store_dir": store_dir, "attempt": attempt},
                                num_gpus=cfg.teacher.gpus_per_teacher, num_cpus=0,
                                resources={cfg.teacher.node_resource: 1} if cfg.teacher.node_resource else None,
                                compute=ray.data.ActorPoolStrategy(size=cfg.teacher.num_teachers))
        return throttled(ds)

    return factory


def ingest_options(cfg: Config) -> "ray.data.ExecutionOptions":
    """Train's default ingest options with the stream's object-store budget capped."""
    with warnings.catch_warnings():  # Ray Train's defaults still pass Data's deprecated exclude_resources
        warnings.filterwarnings("ignore", message=".*exclude_resources")
        opts = ray.train.DataConfig.default_ingest_options()
    opts.resource_limits = opts.resource_limits.copy(object_store_memory=cfg.teacher.max_buffer_mb * 1024**2)
    return opts


STARTED_RAY = False  # ray_init started this process's Ray (so the CLI may shut it down on an error)


def ray_init(log_file: Path | None = None) -> Path | None:
    """Join the cluster in RAY_ADDRESS (``ray job submit``), else start a local Ray.

    ``log_file``: where Ray's worker output goes instead of the console when this process started
    Ray (svis_ray.console); returns the log file in use, or None."""
    global STARTED_RAY
    started = not ray.is_initialized()
    if started:
        STARTED_RAY = True
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # Logical CPUs above the core count: Train workers hold whole CPUs and Ray Data needs some
            # left for decoding, otherwise a 2-core machine deadlocks (see docs/ray notes).
            ray.init(address="local", num_cpus=max(8, 2 * (os.cpu_count() or 1)),
                     object_store_memory=int(os.environ.get("SVIS_OBJECT_STORE_BYTES", 512 * 1024**2)),
                     include_dashboard=True, log_to_driver=True)
    return route_worker_output(log_file, take_over=started) if log_file else None


def user_error_in(exc: BaseException) -> str | None:
    """The one-line ``SvisError`` message buried in a Ray/Train failure, if any.

    Train wraps a worker's error (which may wrap a Ray Data task's error) in ``worker_failures``,
    causes and ``RayTaskError.cause``; walk all of them."""
    stack: list = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e) is SvisError:
            return str(e)
        m = re.search(r"SvisError: (.+)", str(e))
        if m:
            return m.group(1).strip()
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "_base_exc", None)]
        stack += list((getattr(e, "worker_failures", None) or {}).values())
        stack.append(getattr(e, "controller_failure", None))
    return None


class UserErrorFailurePolicy(FailurePolicy):
    """Train's failure policy, except that a user error (``SvisError``: a corrupt frame, a bad
    annotation or checkpoint) anywhere in a failure fails the run at once: no worker-group restart
    can fix it. Real faults (a killed worker, a lost node) are still retried up to max_failures."""

    def __init__(self, default: FailurePolicy) -> None:
        super().__init__(default.failure_config)
        self.default = default

    def make_decision(self, training_failed_error: ray.train.TrainingFailedError) -> FailureDecision:
        if user_error_in(training_failed_error):
            return FailureDecision.RAISE
        return self.default.make_decision(training_failed_error)


class SvisTorchTrainer(TorchTrainer):
    """``TorchTrainer`` whose controller applies ``UserErrorFailurePolicy``. Ray Train 2.60 builds the
    policy from ``FailureConfig`` alone, so this wraps it where fit() hands it to the controller."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = UserErrorFailurePolicy(controller_init_kwargs["failure_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def worker_resources(cfg: Config) -> dict[str, float]:
    """What Ray reserves for each train worker: its CPUs, 1 GPU with ``train.use_gpu``, and 1 of
    the student role resource (``train.node_resource``) when set."""
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    if cfg.train.node_resource:
        resources[cfg.train.node_resource] = 1
    return resources


def build_trainer(cfg: Config, class_names: list[str], store_name: str | None, namespace: str | None,
                  callbacks: list[UserCallback] | None = None, split: SharedSplit | None = None
                  ) -> SvisTorchTrainer:
    """The run's ``TorchTrainer`` (``cfg`` with absolute paths). The process-group backend is left
    to Ray, which picks it from the workers' resources (NCCL for GPU workers, gloo for CPU ones):
    the driver -- often a CPU-only head node -- never decides it from its own CUDA. ``split``:
    the training split's shared index (``make_dataset_factory``)."""
    out = run_dir(cfg)
    world = cfg.train.num_workers
    return SvisTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "class_names": class_names, "store_name": store_name,
                           "namespace": namespace},
        scaling_config=ScalingConfig(num_workers=world, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        torch_config=TorchConfig(),
        run_config=RunConfig(
            name=svis_io.basename(out), **storage_options(out),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep,
                                               checkpoint_score_attribute="val_AP",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[MetricsLogger(out, cfg.train.max_steps, cfg.output.progress_bar),
                       *(callbacks or [])]),
        datasets={"train": make_dataset_factory(cfg, world, len(class_names), store_name, namespace, split)},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options(cfg)),
        validation_config=validation_config(cfg),
    )


def training_split(cfg: Config, shared: SharedSplit | None = None) -> SharedSplit:
    """The run's training split index: ``shared`` when it is this config's (a sweep parses its
    split once for all trials), else parsed now in a one-shot task, with the held-out split
    validated alongside (fail now, not after an hour of training)."""
    from svis_ray.data.ingest import share_split

    if shared is not None and shared.matches(cfg.data.root, cfg.data.train_json):
        return shared
    return share_split(cfg.data.root, cfg.data.train_json, check=(cfg.data.val_json,) if cfg.data.val_json else ())


def run_training(cfg: Config, callbacks: list[UserCallback] | None = None,
                 split: SharedSplit | None = None) -> dict[str, Any]:
    """Train with ``cfg``; returns a summary with the run folder, best checkpoint and metrics.

    ``callbacks`` are extra Ray Train ``UserCallback``s (Tune adds its ``TuneReportCallback``).
    ``split``: an already shared training split (``training_split``), e.g. a sweep's.
    """
    from svis_ray.teacher import WeightStore

    check_config(cfg)
    cfg = absolute_paths(cfg)  # workers do not run in the launch folder
    out = run_dir(cfg)
    log = ray_init(log_file_for(out))
    # Parsed once per run, outside the driver; the controller and the Data tasks share the index.
    split = training_split(cfg, split)
    class_names = list(split.class_names)
    store_name, store = None, None
    if cfg.teacher.mode != "online":
        # Named in the driver's namespace; the handle below keeps it alive until fit() returns.
        store_name = f"svis_weights_{svis_io.basename(out)}_{abs(hash(out)) % 10**8}"
        store = WeightStore.options(name=store_name, namespace=ray.get_runtime_context().namespace,
                                    get_if_exists=True).remote()
    namespace = ray.get_runtime_context().namespace
    svis_io.makedirs(out)
    from svis_ray.config import save_config

    save_config(cfg, svis_io.join(out, "config.yaml"))
    done = _read_progress(out)
    if done:
        msg = f"resuming from step {done} of {cfg.train.max_steps} ({out})"
        in_actor = ray.get_runtime_context().get_actor_id() is not None  # a Tune trial: tag it for the console
        print(console_line(msg) if in_actor else msg, flush=True)
    trainer = build_trainer(cfg, class_names, store_name, namespace, callbacks, split)
    try:
        result = trainer.fit()
        del store
    except ray.train.TrainingFailedError as e:
        msg = user_error_in(e)
        if msg:
            raise SvisError(with_log(msg, log)) from None
        if log and hasattr(e, "add_note"):  # Python 3.11+: shown under the traceback
            e.add_note(f"Ray worker output: {log}")
        raise
    # Without a held-out split every val_AP is -1 and get_best_checkpoint would pick the oldest kept
    # checkpoint; the run's model is then its last one (as MinVIS's model_final.pth).
    best = (result.get_best_checkpoint(metric="val_AP", mode="max") if cfg.data.val_json else None) \
        or result.checkpoint
    if best is None:
        raise SvisError(f"{out}: training finished without a checkpoint")
    summary: dict[str, Any] = {"run_dir": out, "steps": cfg.train.max_steps}
    # File by file from wherever the checkpoint lives (the run folder's filesystem) to the run folder.
    for src, dst in (("model.pt", "best.pt"), ("results.json", "results.json"), ("metrics.json", "metrics.json")):
        path = f"{best.path}/{src}"
        if src == "model.pt" or best.filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            svis_io.copy_file(path, svis_io.join(out, dst), src_filesystem=best.filesystem)
    summary["checkpoint"] = svis_io.join(out, "best.pt")
    if svis_io.exists(svis_io.join(out, "metrics.json")):
        summary["metrics"] = svis_io.read_json(svis_io.join(out, "metrics.json"))
    return summary


def storage_options(out: str) -> dict[str, Any]:
    """``RunConfig`` storage of the run folder ``out``: its parent folder, and for a URI the
    process's cached filesystem of it (then ``storage_path`` is a path on that filesystem)."""
    if not svis_io.is_uri(out):
        return {"storage_path": svis_io.parent(out)}
    fs, path = svis_io.filesystem(svis_io.parent(out))
    return {"storage_path": path, "storage_filesystem": fs}
