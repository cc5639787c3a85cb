"""The teacher pool: Ray Data actors that pseudo-label clips while the student trains.

``Teacher`` is a callable class for ``Dataset.map_batches(..., compute=ActorPoolStrategy)``:
it sits between the decode tasks and the ``TorchTrainer`` workers, so Ray Data's streaming
executor runs teachers and student concurrently with backpressure (no hand-made queues).

Weights: in ``ema`` mode rank 0 of the student publishes an EMA of its weights every K steps to
``WeightStore`` (a named actor holding only the latest version of the current worker-group
attempt as an ObjectRef); teachers poll it between batches and reload when a newer version of
their attempt exists. ``frozen`` teachers load a fixed
checkpoint once.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import torch

from svis_ray.accel import autocast, channels_last, effective_precision, maybe_compile, set_matmul_precision
from svis_ray.config import Config, PseudoConfig, config_from_dict
from svis_ray.model.minvis import preprocess_frames
from svis_ray.pseudo import clip_reliability, pseudo_label_clip, reliability_weight


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class WeightStore:
    """Latest published teacher weights of the current *attempt*: (attempt, step, ObjectRef of a
    CPU state dict).

    An attempt is one start of the Train worker group: the dataset factory calls ``reset`` at every
    (re)start, before any teacher or train worker of that attempt runs, and hands the attempt id to
    the teachers; rank 0 publishes under it. A restart from step S thus drops the lost
    trajectory's weights (published at steps up to S' > S): teachers accept only their attempt's
    weights, so no clip is labelled with them and the lag metric stays >= 0.

    The store re-puts the weights itself so that it owns the object: a ref owned by the train
    worker that published it would die with that worker (``OwnerDiedError``). If the store dies,
    Ray restarts it empty (``attempt`` None); calls made meanwhile are retried. Rank 0 notices an
    empty store from ``held()`` and publishes again (``WeightPublisher``); the first put restores
    the attempt."""

    def __init__(self) -> None:
        self.attempt: int | None = None
        self.step = -1
        self.ref: list[ray.ObjectRef] = []

    def reset(self, attempt: int) -> None:
        self.attempt, self.step, self.ref = attempt, -1, []

    def put(self, attempt: int, step: int, state: dict) -> tuple[int | None, int]:
        """Keep ``state`` if it is newer than what the store holds for ``attempt``; a put from an
        older attempt (a dead worker group's last call) is ignored. Returns ``held()``."""
        if self.attempt is None or attempt > self.attempt:
            self.attempt, self.step = attempt, -1  # restarted store: the put says which attempt runs
        if attempt == self.attempt and step > self.step:
            self.step, self.ref = step, [ray.put(state)]  # in a list: passed on as a ref
        return self.held()

    def get(self, attempt: int, have: int) -> tuple[int, list[ray.ObjectRef]]:
        """(step, [ref]) when the store holds newer weights of ``attempt`` than step ``have``, else (have, [])."""
        if attempt == self.attempt and self.step > have:
            return self.step, self.ref
        return have, []

    def held(self) -> tuple[int | None, int]:
        """(attempt, step) of the weights held; (None, -1) after the store restarted."""
        return self.attempt, self.step

    def current_attempt(self) -> int | None:
        return self.attempt


def teacher_device() -> torch.device:
    """The GPU Ray assigned to this actor, or the CPU when there is none (fake GPUs in tests)."""
    if torch.cuda.is_available() and ray.get_gpu_ids():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
    return torch.device("cpu")


def forward_frames(model: torch.nn.Module, image: np.ndarray, window: int, device: torch.device,
                   precision: str = "fp32", size_multiple: int = 32) -> dict[str, torch.Tensor]:
    """pred_logits / pred_masks / pred_embds for uint8 frames [F,h,w,3] (F >= 1), run ``window``
    frames at a time (``preprocess_frames``: normalised, zero-padded to multiples of
    ``size_multiple``): bounded memory on long clips, and the rest of each output is dropped early.
    Outputs are fp32 whatever the ``precision`` (``svis_ray.accel``) of the forward."""
    window = max(1, window)
    chunks = []
    for s in range(0, len(image), window):
        with autocast(precision, device):
            o = model(preprocess_frames(image[s:s + window], device, size_multiple))
        chunks.append({k: o[k].float() for k in ("pred_logits", "pred_masks", "pred_embds")})
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def forward_clips(model: torch.nn.Module, images: list[np.ndarray], window: int, device: torch.device,
                  precision: str = "fp32", size_multiple: int = 32) -> list[dict[str, torch.Tensor] | None]:
    """``forward_frames`` for the clips of a batch (uint8 [F_c,h_c,w_c,3] each), their frames run
    together: clips of one frame size share forward passes of up to ``window`` frames (one large
    batch keeps a GPU busy where one clip's 3 frames do not). None for a clip without frames."""
    groups: dict[tuple[int, int], list[int]] = {}
    for c, image in enumerate(images):
        if len(image):
            groups.setdefault(tuple(image.shape[1:3]), []).append(c)
    out: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    for clips in groups.values():
        frames = np.concatenate([images[c] for c in clips])
        outputs = forward_frames(model, frames, window, device, precision, size_multiple)
        starts = np.cumsum([0] + [len(images[c]) for c in clips])
        for c, s, e in zip(clips, starts[:-1], starts[1:]):
            out[c] = {k: v[s:e] for k, v in outputs.items()}
    return out


class Teacher:
    """Pseudo-labels a batch of decoded clips (see ``data.ingest.decode_clip`` for the columns).

    Adds ``ps_masks`` uint8 [P,h,w], ``ps_frame`` [P], ``ps_labels`` [P], ``ps_scores`` [P],
    ``ps_anchored`` [P], ``ps_candidates``, ``ps_weight`` (the clip's ``pseudo.reliability`` factor), ``teacher_version`` and ``teacher_time`` (when the
    batch was labelled: lets tests and the timeline benchmark show teacher/student overlap).
    """

    def __init__(self, config: dict[str, Any], num_classes: int, store_name: str | None,
                 namespace: str | None = None, wait_s: float = 600.0, store_dir: str | None = None,
                 attempt: int | None = None) -> None:
        from svis_ray.model import build_model, load_pretrained

        self.cfg: Config = config_from_dict(config)
        if self.cfg.train.torch_threads:
            torch.set_num_threads(self.cfg.train.torch_threads)
        self.device = teacher_device()
        self.model = build_model(self.cfg.model.preset, num_classes, **self.cfg.model.overrides)
        channels_last(self.model.to(self.device).eval(), self.device)
        self.precision = effective_precision(self.cfg.teacher.precision, self.device)
        set_matmul_precision(self.precision)
        # compiled: the same module's weights (reloads reach it), inputs padded to few sizes
        self.forward = maybe_compile(self.model, self.cfg.teacher.compile)
        self.size_multiple = 128 if self.cfg.teacher.compile else 32
        self.version = -1
        self.attempt = attempt  # the worker-group start this pool serves: only its weights are used
        self.store_dir = store_dir  # pseudo.store=parquet: one Parquet file per batch, masks as RLE
        self.parts = 0
        self.store = ray.get_actor(store_name, namespace=namespace) if store_name else None
        if self.cfg.teacher.mode == "frozen":
            load_pretrained(self.model, self.cfg.teacher.checkpoint)
            self.version = 0
        else:
            deadline = time.monotonic() + wait_s
            while not self._refresh():  # the student publishes version 0 before its first step
                if time.monotonic() > deadline:
                    raise TimeoutError(f"teacher: no weights published to {store_name} in {wait_s:.0f} s")
                time.sleep(0.2)

    def _refresh(self) -> bool:
        if self.store is None:
            return False
        version, ref = ray.get(self.store.get.remote(self.attempt, self.version))
        if ref:
            try:
                state = ray.get(ref[0])
            except ray.exceptions.RayError:  # the store died since (its objects with it): keep ours
                return self.version >= 0
            self.model.load_state_dict(state)
            self.version = version
            return True
        return self.version >= 0

    def _write_parquet(self, batch: dict[str, np.ndarray], out: dict[str, list]) -> None:
        """Record every pseudo-label (video, frame, class, score, anchored, teacher version, RLE)."""
        import os
        import socket

        import pyarrow as pa

        from svis_ray import io as svis_io
        import pyarrow.parquet as pq
        from pycocotools import mask as mask_utils

        cols: dict[str, list] = {k: [] for k in ("video_id", "frame", "label", "score", "anchored",
                                                 "teacher_version", "height", "width", "rle")}
        for c in range(len(batch["clip_index"])):
            masks = out["ps_masks"][c]
            if not len(masks):
                continue
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
            for i, rle in enumerate(rles):
                cols["video_id"].append(int(batch["video_id"][c]))
                cols["frame"].append(int(batch["frame_idx"][c][out["ps_frame"][c][i]]))
                cols["label"].append(int(out["ps_labels"][c][i]))
                cols["score"].append(float(out["ps_scores"][c][i]))
                cols["anchored"].append(bool(out["ps_anchored"][c][i]))
                cols["teacher_version"].append(self.version)
                cols["height"].append(int(masks.shape[1]))
                cols["width"].append(int(masks.shape[2]))
                cols["rle"].append(rle["counts"].decode("ascii"))
        # Through the run folder's filesystem: teachers may run on nodes without the run's disk.
        svis_io.makedirs(self.store_dir)
        name = f"part-{socket.gethostname()}-{os.getpid()}-{self.parts:06d}.parquet"  # unique across nodes
        fs, path = svis_io.filesystem(svis_io.join(self.store_dir, name))
        pq.write_table(pa.table(cols), path, filesystem=fs)
        self.parts += 1

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.cfg.teacher.mode == "ema":
            self._refresh()
        pcfg: PseudoConfig = self.cfg.pseudo
        out: dict[str, list] = {k: [] for k in ("ps_masks", "ps_frame", "ps_labels", "ps_scores",
                                                  "ps_anchored", "ps_candidates", "ps_weight")}
        clip_outputs = forward_clips(self.forward, list(batch["image"]), self.cfg.teacher.window, self.device,
                                     self.precision, self.size_multiple)
        for c in range(len(batch["clip_index"])):
            image = batch["image"][c]  # [F,h,w,3]
            h, w = image.shape[1:3]
            outputs = clip_outputs[c]
            per_frame = [] if outputs is None else pseudo_label_clip(
                outputs, (h, w), batch["labelled"][c], batch["gt_masks"][c], batch["gt_frame"][c],
                batch["gt_labels"][c], pcfg, image, tracker=self.cfg.inference.tracker)
            # pseudo.reliability: how well this teacher labels the clip's labelled frame decides
            # how much its labels of the other frames count (1 = fully).
            out["ps_weight"].append(1.0 if outputs is None or pcfg.reliability == "off" else reliability_weight(
                clip_reliability(outputs, (h, w), batch["labelled"][c], batch["gt_masks"][c], batch["gt_frame"][c],
                                 batch["gt_labels"][c], pcfg), pcfg))
            masks, frame_ids, labels, scores, anchored, cands = [], [], [], [], [], 0
            for slot, fp in enumerate(per_frame):
                if fp is None:
                    continue
                masks.append(fp.masks.astype(np.uint8))
                frame_ids += [slot] * len(fp.labels)
                labels.append(fp.labels), scores.append(fp.scores), anchored.append(fp.anchored)
                cands += fp.candidates
            out["ps_masks"].append(np.concatenate(masks) if masks else np.zeros((0, h, w), np.uint8))
            out["ps_frame"].append(np.asarray(frame_ids, np.int64))
            out["ps_labels"].append(np.concatenate(labels) if labels else np.zeros(0, np.int64))
            out["ps_scores"].append(np.concatenate(scores) if scores else np.zeros(0, np.float32))
            out["ps_anchored"].append(np.concatenate(anchored) if anchored else np.zeros(0, bool))
            out["ps_candidates"].append(cands)
        n = len(batch["clip_index"])
        if self.store_dir:
            self._write_parquet(batch, out)
        result = dict(batch)
        result.update(out)
        result["ps_candidates"] = np.asarray(out["ps_candidates"], np.int64)
        result["ps_weight"] = np.asarray(out["ps_weight"], np.float32)
        result["teacher_version"] = np.full(n, self.version, np.int64)
        result["teacher_time"] = np.full(n, time.time(), np.float64)
        return result
