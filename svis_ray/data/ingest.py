"""Ray Data ingest: a streamed clip schedule, frames decoded in Ray Data tasks.

A *clip* is what one training sample is made of: one frame of a video that has ground truth
plus ``unlabelled_per_clip`` other frames of the same video (Sparse-MinVIS samples 1 + 2), in
temporal order. The annotation JSON is parsed once per run, in a one-shot task, into a compact
``SplitIndex`` kept in the object store (``share_split``); the schedule is a lazy range of clip
indices whose blocks become small clip rows (frame paths, the labelled frames' RLEs) in Data
tasks (``schedule_dataset``); decoding, resizing and flipping follow in Ray Data tasks, and the
rows stream on through the teacher pool (pseudo-labels) to the ``TorchTrainer`` workers.

The schedule covers the whole run (``max_steps`` x global batch), so one streaming execution
feeds the entire training: teacher actors stay alive and keep their weights between "epochs".
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import ray
from pycocotools import mask as mask_utils
from ray.data._internal.execution.execution_callback import ExecutionCallback

from svis_ray.data.transforms import resize_image, resize_masks, resized_shape
from svis_ray.data.ytvis import YTVIS, _to_rle, decode_frame
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
    try:
        data = json.loads(read_bytes(path))  # the bytes go as soon as they are parsed
    except json.JSONDecodeError as e:
        raise SvisError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return YTVIS(data, source=path)


# ----------------------------------------------------------------------------- split index
@dataclass
class SplitIndex:
    """What the clip schedule reads of a YTVIS split, as flat arrays: a few bytes per frame and per
    labelled instance instead of a Python dict per annotation (bench/scale.py: a full 100k-video
    split, 515 MB of JSON, peaks at 4.7 GB parsed; its index is 338 MB). Built once
    per run (``share_split``).

    V videos, F frames, L labelled frames, G instances on labelled frames:
      video_id, height, width, length: int64 [V]; frame_start int64 [V+1]: video v's file names
      are file_names[frame_start[v]:frame_start[v+1]] (pyarrow string array [F]);
      labelled_start int64 [V+1] -> labelled_frame int32 [L] (sorted within a video);
      gt_start int64 [L+1] -> per instance, in annotation file order: gt_id int64 [G],
      gt_label int32 [G] (class index), gt_crowd uint8 [G], gt_seg (pyarrow string array [G]:
      compressed RLE counts, or when gt_raw [G] the segmentation as JSON -- a polygon or an
      uncompressed RLE, converted only when a clip uses it).
    """

    source: str
    class_names: list[str]
    video_id: np.ndarray
    height: np.ndarray
    width: np.ndarray
    length: np.ndarray
    frame_start: np.ndarray
    file_names: pa.StringArray
    labelled_start: np.ndarray
    labelled_frame: np.ndarray
    gt_start: np.ndarray
    gt_id: np.ndarray
    gt_label: np.ndarray
    gt_crowd: np.ndarray
    gt_seg: pa.StringArray
    gt_raw: np.ndarray

    @classmethod
    def from_ytvis(cls, ds: YTVIS) -> SplitIndex:
        """The index of a validated split (``YTVIS``); same ground truth as ``annotations_on_frame``."""
        videos = ds.videos
        lengths = np.array([v["length"] for v in videos], np.int64)
        labelled, starts = [], [0]
        gt_start, gt_id, gt_label, gt_crowd, gt_seg, gt_raw = [0], [], [], [], [], []
        for v in videos:
            frames = ds.labelled_frames(v["id"])
            anns = ds.annotations(v["id"])
            labelled += frames
            starts.append(len(labelled))
            for t in frames:
                for a in anns:
                    seg = a["segmentations"][t]
                    if seg is None:
                        continue
                    compressed = isinstance(seg, dict) and isinstance(seg["counts"], str)
                    gt_id.append(a["id"])
                    gt_label.append(ds.cat_to_idx[a["category_id"]])
                    gt_crowd.append(int(a.get("iscrowd", 0)))
                    gt_seg.append(seg["counts"] if compressed else json.dumps(seg))
                    gt_raw.append(not compressed)
                gt_start.append(len(gt_id))
        return cls(
            source=ds.source, class_names=list(ds.class_names),
            video_id=np.array([v["id"] for v in videos], np.int64),
            height=np.array([v["height"] for v in videos], np.int64),
            width=np.array([v["width"] for v in videos], np.int64),
            length=lengths, frame_start=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            file_names=pa.array([n for v in videos for n in v["file_names"]], pa.string()),
            labelled_start=np.array(starts, np.int64), labelled_frame=np.array(labelled, np.int32),
            gt_start=np.array(gt_start, np.int64), gt_id=np.array(gt_id, np.int64),
            gt_label=np.array(gt_label, np.int32), gt_crowd=np.array(gt_crowd, np.uint8),
            gt_seg=pa.array(gt_seg, pa.string()), gt_raw=np.array(gt_raw, bool))

    @property
    def num_videos(self) -> int:
        return len(self.video_id)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in vars(self).values() if isinstance(x, (np.ndarray, pa.Array)))

    def _instances(self, v: int, t: int) -> list[dict[str, Any]]:
        """``YTVIS.annotations_on_frame`` of labelled frame ``t`` of the video at position ``v``."""
        lo, hi = self.labelled_start[v], self.labelled_start[v + 1]
        j = lo + int(np.searchsorted(self.labelled_frame[lo:hi], t))
        h, w = int(self.height[v]), int(self.width[v])
        out = []
        for g in range(self.gt_start[j], self.gt_start[j + 1]):
            seg = self.gt_seg[g].as_py()
            counts = _to_rle(json.loads(seg), h, w)["counts"].decode("ascii") if self.gt_raw[g] else seg
            out.append({"id": int(self.gt_id[g]), "label": int(self.gt_label[g]), "iscrowd": int(self.gt_crowd[g]),
                        "rle": {"size": [h, w], "counts": counts}})
        return out

    def clip_rows(self, clips: np.ndarray, root: str, frames_per_clip: int, seed: int,
                  max_gap: int = 0) -> list[dict[str, Any]]:
        """Rows of the schedule's clips ``clips`` (int64 [K] schedule indices): O(K), whatever the
        number of videos or of clips in the run. See ``clip_rows`` for the sampling."""
        n = self.num_videos
        clips = np.asarray(clips, np.int64)
        epochs, slots = np.divmod(clips, n)
        order = np.empty_like(clips)
        for epoch in np.unique(epochs):  # a block of clips spans one or two passes
            at = epochs == epoch
            order[at] = permute(slots[at], n, (seed, int(epoch)))
        rows = []
        for i, epoch, v in zip(clips.tolist(), epochs.tolist(), order.tolist()):
            vid, length = int(self.video_id[v]), int(self.length[v])
            rng = np.random.default_rng([seed, epoch, vid])
            labelled = self.labelled_frame[self.labelled_start[v]:self.labelled_start[v + 1]].tolist()
            frames: list[int] = []
            if labelled:
                frames.append(int(rng.choice(labelled)))
            others = [t for t in range(length) if t not in frames
                      and (not max_gap or not frames or abs(t - frames[0]) <= max_gap)]
            want = frames_per_clip - len(frames)
            if others and want > 0:
                frames += [int(t) for t in rng.choice(others, size=want, replace=len(others) < want)]
            frames.sort()
            labelled_set = set(labelled)
            gt = [self._instances(v, t) if t in labelled_set else None for t in frames]
            names = self.file_names.slice(int(self.frame_start[v]), length)
            rows.append({
                "clip_index": i,
                "video_id": vid,
                "height": int(self.height[v]),
                "width": int(self.width[v]),
                "frame_idx": frames,
                "paths": [resolve(root, "JPEGImages/" + names[t].as_py()) for t in frames],
                "gt_json": json.dumps(gt),
            })
        return rows


# ----------------------------------------------------------------------------- video order
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 [K] -> uint64 [K]): the Feistel round function."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(slots: np.ndarray, n: int, key: tuple[int, ...], rounds: int = 6) -> np.ndarray:
    """Position ``slots`` (int64 [K], each in [0, n)) of a keyed pseudo-random permutation of
    range(n) -> int64 [K]: O(K) time and memory, where ``rng.permutation(n)`` is O(n) per call.

    A balanced Feistel network over the smallest even number of bits covering n is a bijection
    of [0, 4**h) whatever its round function; cycle-walking (applying it again while the value
    is >= n, fewer than 4 times on average) restricts it to a bijection of range(n). Round keys
    come from ``SeedSequence(key)``, so the order is a pure function of (key, n).
    """
    slots = np.asarray(slots, np.int64)
    if n <= 1:
        return np.zeros_like(slots)
    half = np.uint64(max(1, ((n - 1).bit_length() + 1) // 2))
    mask = (np.uint64(1) << half) - np.uint64(1)
    keys = np.random.SeedSequence(list(key)).generate_state(rounds, np.uint64)
    x = slots.astype(np.uint64)
    todo = np.ones(len(x), bool)
    while todo.any():
        left, right = x[todo] >> half, x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << half) | right
        todo &= x >= np.uint64(n)
    return x.astype(np.int64)


# ----------------------------------------------------------------------------- the schedule
def clip_rows(ds: YTVIS | SplitIndex, root: str, num_clips: int, frames_per_clip: int, seed: int,
              first_clip: int = 0, max_gap: int = 0) -> list[dict[str, Any]]:
    """Rows for clips ``first_clip .. num_clips-1`` of a deterministic, seeded sampling schedule.

    Videos are visited in a fresh pseudo-random order each pass (``permute`` keyed by seed and
    pass); in each clip one frame comes from the video's labelled frames (if any) and the rest
    from its other frames, without replacement where the video is long enough. ``max_gap > 0``
    keeps the other frames within that many frames of the labelled one: pseudo-labels are more
    often right close to the ground truth (anchoring has the labelled frame's masks to match),
    though a gap of 1 gained nothing on the demo data. Clip ``i`` is the same whatever
    ``first_clip`` is, so a resumed run continues the schedule instead of replaying it.
    Training streams the same rows (``schedule_dataset``) instead of building this list.
    """
    index = ds if isinstance(ds, SplitIndex) else SplitIndex.from_ytvis(ds)
    return index.clip_rows(np.arange(first_clip, num_clips), root, frames_per_clip, seed, max_gap)


@dataclass(frozen=True)
class SharedSplit:
    """A split's ``SplitIndex`` in the object store (``ref``) and the little the driver needs of
    it. Pickles as the reference: the Train controller (every worker-group start), the schedule's
    Data tasks and Tune's trials all read the one index the driver's ``share_split`` built."""

    root: str
    rel: str
    source: str
    class_names: tuple[str, ...]
    num_videos: int
    nbytes: int
    ref: Any  # ray.ObjectRef of the SplitIndex

    def matches(self, root: str, rel: str) -> bool:
        return (self.root, self.rel) == (root, rel)

    def get(self) -> SplitIndex:
        return _fetch(self.ref)


@functools.lru_cache(maxsize=2)  # per process: a Data worker reads the index once, not per block
def _fetch(ref) -> SplitIndex:
    return ray.get(ref)  # the arrays map the object store's copy: no per-process copy


def _build_index(root: str, rel: str) -> tuple[dict[str, Any], SplitIndex]:
    index = SplitIndex.from_ytvis(load_split(root, rel))
    return {"source": index.source, "class_names": tuple(index.class_names), "num_videos": index.num_videos,
            "nbytes": index.nbytes}, index


def _check_split(root: str, rel: str) -> None:
    load_split(root, rel)


def _one_shot(fn, root: str, rel: str, num_returns: int):
    """Run ``fn(root, rel)`` as a Ray task in a process of its own that exits afterwards
    (``max_calls=1``): parsing a large JSON leaves a heap that Python does not give back, so it
    must not happen in the driver or a reused worker. ``scheduling_strategy="DEFAULT"``: outside
    the placement group of a Tune trial, which has no CPU to spare."""
    task = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(fn)
    return task.options(num_returns=num_returns, scheduling_strategy="DEFAULT",
                        name=fn.__name__.lstrip("_")).remote(root, rel)


def _get_one_line(refs):
    """``ray.get``, with a task's ``SvisError`` re-raised as its one line (``train.user_error_in``)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        from svis_ray.train import user_error_in  # the driver has it loaded already

        message = user_error_in(e)
        if message is not None:
            raise SvisError(message) from None
        raise


def share_split(root: str, rel: str, check: tuple[str, ...] = ()) -> SharedSplit:
    """Parse and validate ``root/rel`` once, in a one-shot task, and keep its ``SplitIndex`` in
    the object store; the caller (the driver) owns it while it holds the ``SharedSplit``.
    ``check``: other files under ``root`` validated at the same time (the held-out split)."""
    info, ref = _one_shot(_build_index, root, rel, 2)
    _get_one_line([_one_shot(_check_split, root, other, 1) for other in check])
    return SharedSplit(root=root, rel=rel, ref=ref, **_get_one_line(info))


def _schedule_block(batch: dict[str, np.ndarray], split: SharedSplit, root: str, first_clip: int,
                    frames_per_clip: int, seed: int, max_gap: int) -> pa.Table:
    rows = split.get().clip_rows(first_clip + batch["id"], root, frames_per_clip, seed, max_gap)
    return pa.Table.from_pylist(rows)


def schedule_dataset(split: SharedSplit, root: str, num_clips: int, frames_per_clip: int, seed: int,
                     first_clip: int = 0, max_gap: int = 0, clips_per_block: int = 1, **map_args):
    """``clip_rows`` as a lazy Ray Dataset: a range of schedule indices whose blocks
    (``clips_per_block`` clips each, one training step) become clip rows in Data tasks as the
    stream reaches them. Nothing here grows with the number of clips but Data's read-task list.

    ``map_args`` (``num_cpus``, ``compute``) go to the range and to the rows' ``map_batches``:
    given the next stage's, Ray Data fuses range, rows and that stage into one task per block, as
    the decode tasks were over in-memory rows. ``ray.data.range`` takes no resources, and its
    read tasks would each hold a whole logical CPU in an operator of their own -- hence
    ``read_datasource`` of Ray Data's own (internal) range source."""
    from ray.data._internal.datasource.range_datasource import RangeDatasource

    n = max(0, num_clips - first_clip)
    ds = ray.data.read_datasource(RangeDatasource(n, column_name="id"),
                                  override_num_blocks=max(1, n // max(1, clips_per_block)), **map_args)
    return ds.map_batches(_schedule_block, batch_size=None, batch_format="numpy", fn_kwargs={
        "split": split, "root": root, "first_clip": first_clip, "frames_per_clip": frames_per_clip,
        "seed": seed, "max_gap": max_gap}, **map_args)


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
