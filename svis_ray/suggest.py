"""``svis-ray suggest-frames``: which K frames of each video to send to annotators.

Two ways to score a video's frames, then one greedy pick of K frames per video:

* **Model-free** (no checkpoint): colour-cluster coverage. The video's pixels (frames shrunk to
  a short side of ``COLOUR_SIDE``) are clustered in Lab colour with k-means (``COLOUR_CLUSTERS``,
  seeded per video); a cluster present on a frame (>= ``PRESENT_FRACTION`` of it) counts with
  weight -log(its share of the video's pixels), so the background's common colours weigh little
  and the rare colours of objects a lot. A frame scores the weights of the clusters it shows that
  the frames already picked do not (a weighted set cover), minus ``MIDDLE_PRIOR`` x its distance
  to the middle frame (in half-videos) -- the middle frame is where the demo generators' objects
  are most often all in view, so the cue must outvote it to move -- plus ``SPREAD`` x its distance
  to the nearest frame already picked (in videos), so K > 1 frames spread out. Measured against
  ``middle`` on the demo families' training videos (objects visible on the chosen frame, issue 28;
  docs/experiments.md): shapes 2.53 vs 2.50 (2.58 at best), creatures 2.01 vs 1.78 (2.25 at best);
  a saturation-area cue and blob counts did worse on one family or the other.
* **Checkpoint**: the model's own signals, computed by Ray Data batch inference (an actor pool
  of ``FrameScorer``s, as ``predict``), one video per call. Queries are aligned across frames by
  MinVIS's embedding matching (``tracking.match_embeddings``); for each frame t and each query q
  that is an object somewhere in the video (foreground probability >= ``ACTIVE`` on some frame),
  with f = its foreground probability (1 - p(no object)):
  ``f x (1 - class confidence) + f x (1 - mask IoU with the neighbouring frames) + |f - f of the
  neighbours| + 4 f (1 - f) / 2`` -- objects the model is unsure of the class of, whose mask jumps
  between neighbouring frames, tracks appearing or vanishing, borderline detections. A frame's
  score is the sum over the queries: labelling it teaches the model what it gets wrong there.
  The greedy pick suppresses frames near those already picked (``labelled``, or earlier picks):
  gain = score x (1 - exp(-distance / (L / 2K))).

Output: ``suggestions.json`` = ``{"suggest": {method, per_video, source, checkpoint},
"videos": {"<video id>": {"frames": [t, ...], "scores": [...], "frame_scores": [per frame]}}}``
(frames in pick order, best first) and ``suggestions.csv`` next to it (``video_id, file_name,
frame_index, score``, one row per frame to label) for annotation tools. ``svis-ray sparsify
--frames-from suggestions.json`` keeps exactly those frames' labels (``load_frames``).
"""
from __future__ import annotations

import csv
import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np
import ray
import torch

from svis_ray.data.ingest import read_bytes, resolve
from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray.errors import SvisError
from svis_ray.io import atomic_path, read_json, write_json

COLOUR_SIDE = 32  # frames shrunk to this short side for the colour clusters
COLOUR_CLUSTERS = 12
PRESENT_FRACTION = 0.005  # a cluster is on a frame when it covers this share of it
MIDDLE_PRIOR = 0.3  # score units (the best frame's coverage = 1) per half-video from the middle
SPREAD = 0.1  # score units per video-length of distance to the nearest picked frame
ACTIVE = 0.3  # a query is an object of the video if its foreground probability reaches this once


# ----------------------------------------------------------------------------- model-free
def colour_clusters(frames: Iterable[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lab k-means over a video's shrunk frames -> (presence [T, C] bool, weight [C] = -log share)."""
    lab = []
    for img in frames:
        h, w = img.shape[:2]
        s = COLOUR_SIDE / min(h, w)
        small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        lab.append(cv2.cvtColor(small, cv2.COLOR_RGB2LAB).reshape(-1, 3))
    pixels = np.concatenate(lab).astype(np.float32)
    k = min(COLOUR_CLUSTERS, len(np.unique(pixels, axis=0)))
    cv2.setRNGSeed(seed)  # k-means++ seeding draws from OpenCV's global generator
    _, labels, _ = cv2.kmeans(pixels, k, None, (cv2.TERM_CRITERIA_MAX_ITER + cv2.TERM_CRITERIA_EPS, 20, 0.5),
                              2, cv2.KMEANS_PP_CENTERS)
    per_frame = np.split(labels.ravel(), np.cumsum([len(x) for x in lab])[:-1])
    share = np.stack([np.bincount(x, minlength=k) / len(x) for x in per_frame])  # [T, C]
    return share >= PRESENT_FRACTION, -np.log(share.mean(0) + 1e-9)


def pick_by_coverage(present: np.ndarray, weight: np.ndarray, k: int,
                     labelled: Iterable[int] = ()) -> tuple[list[int], list[float], list[float]]:
    """Greedy weighted set cover of colour clusters (module docstring) -> (frames, their gains,
    first-pick score of every frame). ``labelled``: frames already annotated (covered, not picked)."""
    T = len(present)
    t_all = np.arange(T)
    mid_dist = np.abs(t_all - T // 2) / max(T // 2, 1)
    covered = np.zeros(present.shape[1], bool)
    chosen = [int(t) for t in labelled]
    for t in chosen:
        covered |= present[t]
    picks, gains, first = [], [], None
    for _ in range(k):
        cover = (present & ~covered) @ weight
        best = cover.max()
        score = cover / best if best > 0 else np.zeros(T)
        score = score - MIDDLE_PRIOR * mid_dist
        if chosen:
            score = score + SPREAD * np.min(np.abs(t_all[:, None] - np.array(chosen)[None]), 1) / T
        if first is None:
            first = score.copy()
        score[chosen] = -np.inf
        t = int(np.argmax(score))
        picks.append(t), gains.append(float(score[t])), chosen.append(t)
        covered |= present[t]
    return picks, gains, [float(x) for x in first]


# ----------------------------------------------------------------------------- model signals
@torch.no_grad()
def model_frame_scores(model: Callable[[torch.Tensor], dict], frames: Iterable[np.ndarray], window: int = 30,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """Per-frame "labelling would help here" score [T] from a per-frame MinVIS model (module docstring).

    frames: uint8 RGB [h, w, 3], resized for inference; the model runs ``window`` frames at a time.
    """
    from svis_ray.model.minvis import preprocess_frames
    from svis_ray.tracking import _windows, mask_iou, match_embeddings

    if isinstance(model, torch.nn.Module):
        model.eval()
    probs: list[torch.Tensor] = []  # per frame [Q, K+1], aligned to the first frame's query order
    masks: list[torch.Tensor] = []  # per frame [Q, h/4, w/4] bool
    prev_embds = prev_masks = None
    for chunk in _windows(frames, window):
        out = model(preprocess_frames(chunk, device))
        for logits, mask, embds in zip(out["pred_logits"], out["pred_masks"], out["pred_embds"]):
            perm = (torch.arange(len(embds)) if prev_embds is None
                    else match_embeddings(prev_embds, embds, prev_masks, mask)).to(embds.device)
            prev_embds, prev_masks = embds[perm], mask[perm]
            probs.append(logits[perm].float().softmax(-1).cpu())
            masks.append((mask[perm] > 0).cpu())
    if not probs:
        return np.zeros(0)
    p = torch.stack(probs)  # [T, Q, K+1]
    fg = 1 - p[..., -1]  # [T, Q]
    conf = p[..., :-1].max(-1).values / fg.clamp(min=1e-6)  # class confidence given an object
    T = len(p)
    active = fg.max(0).values >= ACTIVE  # [Q]
    disagree, jump = torch.zeros_like(fg), torch.zeros_like(fg)
    for t in range(T):
        near = [n for n in (t - 1, t + 1) if 0 <= n < T]
        if near:
            ious = torch.stack([mask_iou(masks[t], masks[n]).diagonal() for n in near])  # [N, Q]
            disagree[t] = (1 - ious).mean(0)
            jump[t] = torch.stack([(fg[t] - fg[n]).abs() for n in near]).max(0).values
    score = fg * (1 - conf.clamp(max=1)) + fg * disagree + jump + 2 * fg * (1 - fg)
    return (score * active).sum(1).numpy()


def pick_by_score(score: np.ndarray, k: int, labelled: Iterable[int] = ()) -> tuple[list[int], list[float]]:
    """Greedy pick of ``k`` frames by ``score`` [T], suppressing frames near earlier picks and
    ``labelled`` ones: gain = score x (1 - exp(-distance / (T / 2k)))."""
    T = len(score)
    t_all = np.arange(T)
    chosen = [int(t) for t in labelled]
    scale = max(T / (2 * k), 1.0)
    picks, gains = [], []
    for _ in range(k):
        gain = np.asarray(score, np.float64).copy()
        if chosen:
            gain *= 1 - np.exp(-np.min(np.abs(t_all[:, None] - np.array(chosen)[None]), 1) / scale)
        gain[chosen] = -np.inf
        t = int(np.argmax(gain))
        picks.append(t), gains.append(float(gain[t])), chosen.append(t)
    return picks, gains


class FrameScorer:
    """Ray Data actor for ``map_batches``: loads the checkpoint once, then scores one video's frames
    per row. Input ``index``, ``video_id``; output ``index``, ``scores`` (JSON list, one per frame),
    ``seconds`` and ``error`` (an SvisError message, "" if none)."""

    def __init__(self, checkpoint: str, split: YTVIS, root: str, min_size: int, max_size: int, window: int):
        from svis_ray.predict import load_frame_model
        from svis_ray.teacher import teacher_device

        self.model, _, self.device = load_frame_model(checkpoint, teacher_device(), split.class_names,
                                                      str(split.source))
        self.split, self.root, self.min_size, self.max_size, self.window = split, root, min_size, max_size, window

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from svis_ray.inference import video_frames

        out: dict[str, list[Any]] = {"index": [], "scores": [], "seconds": [], "error": []}
        for index, video_id in zip(batch["index"], batch["video_id"]):
            start = time.perf_counter()
            video = self.split.video(int(video_id))
            try:
                frames = video_frames(self.split, video, self.root, self.min_size, self.max_size)
                scores, error = model_frame_scores(self.model, frames, self.window, self.device).tolist(), ""
            except SvisError as e:
                scores, error = [], str(e)
            out["index"].append(int(index))
            out["scores"].append(json.dumps(scores))
            out["seconds"].append(time.perf_counter() - start)
            out["error"].append(error)
        return {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- files
def load_frames(path: str | os.PathLike, what: str = "suggestions file") -> dict[int, list[int]]:
    """Video id -> frame indices from a suggestions.json (``{"videos": {id: {"frames": [...]}}}``)
    or a plain ``{id: [frames]}`` mapping; one-line SvisError for anything else."""
    data = read_json(path, what)
    videos = data.get("videos", data) if isinstance(data, dict) else None
    if not isinstance(videos, dict):
        raise SvisError(f"{path}: expected an object mapping video ids to frame indices (a suggestions.json)")
    out: dict[int, list[int]] = {}
    for key, entry in videos.items():
        frames = entry.get("frames") if isinstance(entry, dict) else entry
        try:
            vid = int(key)
        except ValueError:
            raise SvisError(f"{path}: video id {key!r} is not an integer") from None
        if not isinstance(frames, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in frames):
            raise SvisError(f"{path}: video {key}: frames must be a list of non-negative integers, got {frames!r}")
        if len(set(frames)) != len(frames):
            raise SvisError(f"{path}: video {key}: frame indices repeat: {frames}")
        out[vid] = frames
    return out


def _write_csv(path: Path, split: YTVIS, videos: dict[str, dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video_id", "file_name", "frame_index", "score"])
            for key, entry in videos.items():
                names = split.video(int(key))["file_names"]
                for t, s in zip(entry["frames"], entry["scores"]):
                    w.writerow([key, names[t], t, f"{s:.4f}"])


def _decode_video(split: YTVIS, video: dict[str, Any], root: str) -> list[np.ndarray]:
    return [decode_frame(read_bytes(p), source=p) for p in (resolve(root, "JPEGImages/" + n) for n in video["file_names"])]


def suggest_frames(videos_json: str | os.PathLike, frame_root: str | None, per_video: int, out: str | os.PathLike,
                   *, checkpoint: str | os.PathLike | None = None, labelled: str | os.PathLike | None = None,
                   num_actors: int = 1, gpus_per_actor: float = 0.0, window: int = 30,
                   min_size: int | None = None, max_size: int | None = None,
                   log: Callable[[str], None] = partial(print, flush=True)) -> dict[str, Any]:
    """Pick ``per_video`` frames of every video of ``videos_json`` to label; write ``out`` (JSON) and
    ``out`` with a .csv suffix. ``labelled``: a suggestions or sparse YTVIS file whose frames are
    annotated already (they are neither picked again nor, with a checkpoint, near the picks).
    Returns the summary: videos, frames (picked), method, seconds, outputs."""
    src, out_path = Path(videos_json), Path(out)
    if per_video < 1:
        raise SvisError(f"suggest-frames: --per-video must be at least 1, got {per_video}")
    if num_actors < 1 or gpus_per_actor < 0:
        raise SvisError(f"suggest-frames: actors must be >= 1 and gpus per actor >= 0, got {num_actors}, {gpus_per_actor}")
    split = YTVIS.load(src)
    if not split.videos:
        raise SvisError(f"{src}: the file lists no videos")
    root = frame_root or str(src.parent)
    root = root if "://" in root else str(Path(root).resolve())
    given = _labelled_frames(labelled, split) if labelled else {}
    for v in split.videos:
        free = v["length"] - len(given.get(v["id"], []))
        if per_video > free:
            raise SvisError(f"{src}: video {v['id']} has {v['length']} frames"
                            + (f" ({v['length'] - free} labelled already)" if v["id"] in given else "")
                            + f", fewer than --per-video {per_video}")
    start = time.perf_counter()
    videos: dict[str, dict[str, Any]] = {}
    if checkpoint is None:
        method = "colour-coverage"
        for i, v in enumerate(split.videos):
            present, weight = colour_clusters(_decode_video(split, v, root), seed=int(v["id"]))
            frames, gains, first = pick_by_coverage(present, weight, per_video, given.get(v["id"], []))
            videos[str(v["id"])] = {"frames": frames, "scores": gains, "frame_scores": first}
        log(f"suggest-frames: {len(videos)} videos scored by colour coverage in {time.perf_counter() - start:.1f} s")
    else:
        method = "model"
        per_frame = _model_scores(Path(checkpoint), split, src, root, out_path, num_actors, gpus_per_actor, window,
                                  min_size, max_size, log)
        for v in split.videos:
            score = np.asarray(per_frame[v["id"]])
            frames, gains = pick_by_score(score, per_video, given.get(v["id"], []))
            videos[str(v["id"])] = {"frames": frames, "scores": gains, "frame_scores": score.tolist()}
    meta = {"method": method, "per_video": per_video, "source": str(src),
            "checkpoint": str(checkpoint) if checkpoint else None, "labelled": str(labelled) if labelled else None}
    write_json(out_path, {"suggest": meta, "videos": videos})
    csv_path = out_path.with_suffix(".csv")
    _write_csv(csv_path, split, videos)
    return {"videos": len(videos), "frames": sum(len(e["frames"]) for e in videos.values()), "method": method,
            "seconds": round(time.perf_counter() - start, 3), "outputs": [str(out_path), str(csv_path)]}


def _labelled_frames(path: str | os.PathLike, split: YTVIS) -> dict[int, list[int]]:
    """Frames already labelled, from a suggestions file or a sparse YTVIS file (``labelled_frames``)."""
    data = read_json(path, "labelled-frames file")
    if isinstance(data, dict) and isinstance(data.get("videos"), list):  # a (sparse) YTVIS file
        frames = {int(v["id"]): list(YTVIS(data, source=path).labelled_frames(v["id"])) for v in data["videos"]}
    else:
        frames = load_frames(path, "labelled-frames file")
    lengths = {v["id"]: v["length"] for v in split.videos}
    for vid, ts in frames.items():
        if vid in lengths and any(t >= lengths[vid] for t in ts):
            raise SvisError(f"{path}: video {vid}: frame {max(ts)} is past its {lengths[vid]} frames")
    return frames


def _model_scores(ckpt: Path, split: YTVIS, src: Path, root: str, out: Path, num_actors: int,
                  gpus_per_actor: float, window: int, min_size: int | None, max_size: int | None,
                  log: Callable[[str], None]) -> dict[int, list[float]]:
    """Per-frame model scores of every video, by a Ray Data actor pool of ``FrameScorer``s."""
    from svis_ray.console import log_file_for
    from svis_ray.predict import _check_classes, _inference_size, load_frame_model
    from svis_ray.train import ray_init

    if not ckpt.exists():
        raise SvisError(f"{ckpt}: checkpoint not found")
    _, info, _ = load_frame_model(ckpt, "cpu", split.class_names, str(src))
    _check_classes(ckpt, info, split)
    short, longest = _inference_size(info, min_size, max_size)
    light = YTVIS({"videos": split.videos, "categories": split.categories}, source=src)  # no annotations to ship
    ray_init(log_file_for(out.parent))
    rows = [{"index": i, "video_id": v["id"]} for i, v in enumerate(light.videos)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        FrameScorer, fn_constructor_kwargs={"checkpoint": str(ckpt.resolve()), "split": light, "root": root,
                                            "min_size": short, "max_size": longest, "window": window},
        compute=ray.data.ActorPoolStrategy(size=num_actors), batch_size=1, num_gpus=gpus_per_actor,
        num_cpus=0 if gpus_per_actor > 0 else 1)  # as predict: a GPU actor's CPU share would starve the decoders
    log(f"suggest-frames: {len(rows)} videos of {src} scored by {ckpt} on {num_actors} actor(s) at short side {short}")
    scores: dict[int, list[float]] = {}
    for row in ds.iter_rows():
        if row["error"]:
            raise SvisError(str(row["error"]))
        video = light.videos[int(row["index"])]
        scores[video["id"]] = json.loads(row["scores"])
        log(f"[{len(scores)}/{len(rows)}] video {video['id']}: {video['length']} frames in {row['seconds']:.1f} s")
    return scores
