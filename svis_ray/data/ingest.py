"""Ray Data ingest: clip rows built on the driver, frames decoded in Ray Data tasks.

A *clip* is what one training sample is made of: one frame of a video that has ground truth
plus ``unlabelled_per_clip`` other frames of the same video (Sparse-MinVIS samples 1 + 2), in
temporal order. The annotation JSON is parsed on the driver (``read_json`` cannot read the
nested YTVIS layout) into one small row per clip holding frame paths and the labelled frames'
RLEs; decoding, resizing and flipping happen in Ray Data tasks, and the rows stream on through
the teacher pool (pseudo-labels) to the ``TorchTrainer`` workers.

The row list covers the whole run (``max_steps`` x global batch), so one streaming execution
feeds the entire training: teacher actors stay alive and keep their weights between "epochs".
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from ray.data._internal.execution.execution_callback import ExecutionCallback

from svis_ray.data.transforms import resize_image, resize_masks, resized_shape
from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray import io as svis_io
from svis_ray.errors import SvisError


# ----------------------------------------------------------------------------- scheduling
class IdleThrottle(ExecutionCallback):
    """Backs Ray Data's scheduling loop off while its steps return at once.

    The streaming executor blocks in ``ray.wait`` only while a task is running. When the student
    backpressures the stream (the normal state of a training stream) the loop spins: measured with
    py-spy, a third of a core in resource bookkeeping on the coordinator actor, taken from the
    student and the teachers. So after a step shorter than ``MAX_SLEEP_S`` (it waited on nothing)
    the loop sleeps 1 ms, doubling up to ``MAX_SLEEP_S`` while such steps continue; a step that
    waited resets it. The short first sleeps matter: a single short step (a task finished, the
    consumer took its block) is usually followed by a dispatch, and a flat 20 ms sleep there held
    the decode tasks of ``bench/ingest.py`` to 249-254 frames/s against 279-293 without a
    throttle. Skipping the sleep whenever tasks are in flight is not enough: tasks paused by
    backpressure count as in flight, and the coordinator then spun at 0.7 of a core.
    ``ExecutionCallback`` is internal to Ray Data (registered through the public
    ``DataContext.custom_execution_callback_classes``); the pinned Ray release is the one this
    was measured with.
    """

    FIRST_SLEEP_S = 0.001
    MAX_SLEEP_S = 0.02

    def __init__(self):
        self._last = time.perf_counter()
        self._sleep = self.FIRST_SLEEP_S

    def on_execution_step(self, executor) -> None:
        if time.perf_counter() - self._last >= self.MAX_SLEEP_S:  # the step waited: not spinning
            self._sleep = self.FIRST_SLEEP_S
        else:
            time.sleep(self._sleep)
            # The sleep itself, not a count of short steps: 2**n overflowed float after ~20 s of
            # backpressure (1024 steps) and killed the stream.
            self._sleep = min(self.MAX_SLEEP_S, 2 * self._sleep)
        self._last = time.perf_counter()


def throttled(ds):
    """``ds`` with ``IdleThrottle`` on its scheduling loop (the context travels with the dataset
    to the actor that executes a ``streaming_split``)."""
    callbacks = ds.context.custom_execution_callback_classes
    if IdleThrottle not in callbacks:
        callbacks.append(IdleThrottle)
    return ds


# ----------------------------------------------------------------------------- file access
def resolve(root: str, rel: str) -> str:
    """Join ``rel`` under ``root`` unless it is already absolute or a URI."""
    if "://" in rel or rel.startswith("/"):
        return rel
    return root.rstrip("/") + "/" + rel


def read_bytes(path: str) -> bytes:
    """Read a local file or a ``pyarrow.fs`` URI (s3://, gs://, hdfs://) into memory, through
    the process's cached filesystem (``svis_ray.io.filesystem``): one per bucket, not per frame."""
    return svis_io.read_bytes(path)


def load_split(root: str, rel: str) -> YTVIS:
    """Load and validate a YTVIS annotation file under ``root`` (local or URI)."""
    path = resolve(root, rel)
    raw = read_bytes(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SvisError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return YTVIS(data, source=path)


# ----------------------------------------------------------------------------- clip rows
def clip_rows(ds: YTVIS, root: str, num_clips: int, frames_per_clip: int, seed: int,
              first_clip: int = 0, max_gap: int = 0) -> list[dict[str, Any]]:
    """Rows for clips ``first_clip .. num_clips-1`` of a deterministic, seeded sampling schedule.

    Videos are visited in a fresh random order each pass; in each clip one frame comes from the
    video's labelled frames (if any) and the rest from its other frames, without replacement
    where the video is long enough. ``max_gap > 0`` keeps the other frames within that many
    frames of the labelled one: pseudo-labels are more often right close to the ground truth
    (anchoring has the labelled frame's masks to match), though a gap of 1 gained nothing on the
    demo data. Clip ``i`` is the same whatever
    ``first_clip`` is, so a resumed run continues the schedule instead of replaying it.
    """
    videos = [v for v in ds.videos]
    rows = []
    for i in range(first_clip, num_clips):
        epoch, slot = divmod(i, len(videos))
        order = np.random.default_rng([seed, epoch]).permutation(len(videos))
        video = videos[order[slot]]
        vid = video["id"]
        rng = np.random.default_rng([seed, epoch, vid])
        length = video["length"]
        labelled = set(ds.labelled_frames(vid))
        frames: list[int] = []
        if labelled:
            frames.append(int(rng.choice(sorted(labelled))))
        others = [t for t in range(length) if t not in frames
                  and (not max_gap or not frames or abs(t - frames[0]) <= max_gap)]
        want = frames_per_clip - len(frames)
        if others and want > 0:
            frames += [int(t) for t in rng.choice(others, size=want, replace=len(others) < want)]
        frames.sort()
        gt = []
        for t in frames:
            if t in labelled:
                tg = ds.annotations_on_frame(vid, t)
                gt.append(tg)
            else:
                gt.append(None)
        rows.append({
            "clip_index": i,
            "video_id": vid,
            "height": video["height"],
            "width": video["width"],
            "frame_idx": frames,
            "paths": [resolve(root, "JPEGImages/" + video["file_names"][t]) for t in frames],
            "gt_json": json.dumps(gt),
        })
    return rows


# ----------------------------------------------------------------------------- decode task
@dataclass
class DecodeConfig:
    min_sizes: tuple[int, ...]
    max_size: int
    flip: bool
    on_bad_frame: str  # "fail" | "skip"
    seed: int


def decode_clip(row: dict[str, Any], cfg: DecodeConfig) -> dict[str, Any]:
    """Decode, resize and flip one clip; ground-truth masks follow the same transform.

    Output columns (F frames kept, M ground-truth instances over the labelled frames):
      image uint8 [F,h,w,3]; frame_idx int64 [F]; labelled bool [F];
      gt_masks uint8 [M,h,w]; gt_frame int64 [M] (slot in the clip); gt_labels int64 [M];
      video_id, clip_index, bad_frames (frames skipped under on_bad_frame=skip).
    """
    rng = np.random.default_rng([cfg.seed, int(row["clip_index"]), 7])
    short = int(rng.choice(cfg.min_sizes))
    flip = bool(cfg.flip and rng.random() < 0.5)
    shape = resized_shape(int(row["height"]), int(row["width"]), short, cfg.max_size)
    gts = json.loads(row["gt_json"])
    h, w = shape
    # Frames are written straight into the output array: no contiguous copy per frame, no final stack.
    image = np.empty((len(row["paths"]), h, w, 3), np.uint8)
    idx, labelled, masks, frames, labels = [], [], [], [], []
    bad = 0
    for path, t, gt in zip(row["paths"], row["frame_idx"], gts):
        try:
            img = decode_frame(read_bytes(str(path)), source=str(path))
            if img.shape[:2] != (int(row["height"]), int(row["width"])):
                raise SvisError(f"{path}: frame is {img.shape[0]}x{img.shape[1]}, the annotation says "
                                f"{row['height']}x{row['width']}")
        except SvisError:
            if cfg.on_bad_frame == "fail":
                raise
            bad += 1
            continue
        slot = len(idx)
        img = resize_image(img, shape)
        if flip:
            cv2.flip(img, 1, dst=image[slot])
        else:
            image[slot] = img
        if gt is not None and len(gt):
            m = mask_utils.decode([g["rle"] for g in gt]).transpose(2, 0, 1)
            m = resize_masks(np.ascontiguousarray(m), shape)
            masks.append(m[:, :, ::-1] if flip else m)
            frames += [slot] * len(gt)
            labels += [g["label"] for g in gt]
        idx.append(int(t))
        labelled.append(gt is not None)
    return {
        "clip_index": int(row["clip_index"]),
        "video_id": int(row["video_id"]),
        "image": image[: len(idx)],
        "frame_idx": np.asarray(idx, np.int64),
        "labelled": np.asarray(labelled, bool),
        "gt_masks": np.concatenate(masks) if masks else np.zeros((0, h, w), np.uint8),
        "gt_frame": np.asarray(frames, np.int64),
        "gt_labels": np.asarray(labels, np.int64),
        "bad_frames": bad,
    }
