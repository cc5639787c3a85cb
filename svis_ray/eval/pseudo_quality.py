"""Pseudo-label quality of a checkpoint, measured offline against the full annotation.

Held-out AP on a small split moves by 1-2 points between repeated training runs, so it cannot
tell two pseudo-label filters apart. This diagnostic scores the pseudo-labels themselves: a
teacher checkpoint labels every unlabelled frame of the sparse training split, and each frame's
pseudo-labels are compared with that frame's full ground truth (which training never sees).
On the demo data that is about 1,000 objects per 40 videos.

Each unlabelled frame ``t`` of a video is labelled in a two-frame clip (labelled frame, ``t``)
at the test resolution, the way the training teacher labels a clip of 1 labelled + 1
unlabelled frame (``data.unlabelled_per_clip=1``), anchoring included. A pseudo-label is
correct when a one-to-one matching to the frame's ground truth (Hungarian on mask IoU, same
class only) pairs it at IoU >= ``iou``. Precision = correct / kept; recall = correct / ground-
truth instances on the unlabelled frames. Several unanchored score thresholds are scored from
one pass over the model, since only the filter differs.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment

from svis_ray.config import Config
from svis_ray.data.ingest import DecodeConfig, decode_clip, load_split, resolve
from svis_ray.data.transforms import resize_masks
from svis_ray.data.ytvis import YTVIS
from svis_ray.errors import SvisError
from svis_ray.pseudo import FramePseudo, clip_reliability, pseudo_label_clip, reliability_weight
from svis_ray.teacher import forward_frames
from svis_ray.tracking import mask_iou


def match_frame(pred_masks: np.ndarray, pred_labels: np.ndarray, gt_masks: np.ndarray,
                gt_labels: np.ndarray, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Which pseudo-labels of one frame are correct.

    Args:
        pred_masks: bool [P,H,W]; pred_labels: [P]; gt_masks: bool [M,H,W]; gt_labels: [M].
    Returns: (correct bool [P], best IoU with any ground-truth instance float [P]).
    """
    p, m = len(pred_masks), len(gt_masks)
    if p == 0 or m == 0:
        return np.zeros(p, bool), np.zeros(p)
    ious = mask_iou(torch.from_numpy(pred_masks), torch.from_numpy(gt_masks)).numpy()
    same = ious * (np.asarray(pred_labels)[:, None] == np.asarray(gt_labels)[None])
    rows, cols = linear_sum_assignment(-same)
    correct = np.zeros(p, bool)
    correct[rows] = same[rows, cols] >= iou
    return correct, ious.max(1)


def label_kinds(pred_masks: np.ndarray, pred_labels: np.ndarray, gt_masks: np.ndarray, gt_labels: np.ndarray,
                iou: float = 0.5) -> np.ndarray:
    """What each pseudo-label of one frame is: "correct" (``match_frame``), else "duplicate" (it
    overlaps an object another pseudo-label claims correctly, IoU >= ``iou``), "wrong_class" (an
    unclaimed object, another class), "poor_mask" (best IoU 0.1 to ``iou``) or "background".
    Shapes as in ``match_frame``; returns object [P]."""
    kinds = np.full(len(pred_masks), "background", object)
    if len(pred_masks) == 0 or len(gt_masks) == 0:
        return kinds
    ious = mask_iou(torch.from_numpy(pred_masks), torch.from_numpy(gt_masks)).numpy()
    correct, _ = match_frame(pred_masks, pred_labels, gt_masks, gt_labels, iou)
    claimed = (ious[correct] >= iou).any(0) if correct.any() else np.zeros(len(gt_masks), bool)
    for i, j in enumerate(ious.argmax(1)):
        if correct[i]:
            kinds[i] = "correct"
        elif ious[i, j] >= iou:
            kinds[i] = "duplicate" if claimed[j] or pred_labels[i] == gt_labels[j] else "wrong_class"
        elif ious[i, j] >= 0.1:
            kinds[i] = "poor_mask"
    return kinds


class _Tally:
    """Counts for one filter variant."""

    def __init__(self) -> None:
        self.kept = self.correct = self.anchored = self.anchored_correct = 0
        self.ious: list[float] = []
        self.by_distance: dict[int, list[int]] = {}  # |t - labelled frame| -> [correct, kept]
        self.kinds: dict[str, int] = {}  # label_kinds -> count
        self.dropped = 0  # pseudo-labels of clips pseudo.reliability gave weight 0

    def add(self, fp: FramePseudo, correct: np.ndarray, ious: np.ndarray, distance: int,
            kinds: np.ndarray | None = None) -> None:
        for kind in ([] if kinds is None else kinds):
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.kept += len(correct)
        self.correct += int(correct.sum())
        self.anchored += int(fp.anchored.sum())
        self.anchored_correct += int(correct[fp.anchored].sum())
        self.ious += ious.tolist()
        d = self.by_distance.setdefault(distance, [0, 0])
        d[0] += int(correct.sum())
        d[1] += len(correct)

    def summary(self, gt_instances: int) -> dict[str, Any]:
        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        unanchored = self.kept - self.anchored
        return {
            "precision": ratio(self.correct, self.kept),
            "recall": ratio(self.correct, gt_instances),
            "kept": self.kept,
            "anchored": self.anchored,
            "anchored_precision": ratio(self.anchored_correct, self.anchored),
            "unanchored_precision": ratio(self.correct - self.anchored_correct, unanchored),
            "mean_iou": float(np.mean(self.ious)) if self.ious else None,
            "precision_by_distance": {str(d): ratio(c, k) for d, (c, k) in sorted(self.by_distance.items())},
            "kinds": dict(sorted(self.kinds.items())),
            "dropped_by_reliability": self.dropped,
        }


def frame_gt(full: YTVIS, video_id: int, t: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of frame ``t`` at ``shape``: (masks bool [M,h,w], labels [M]); crowds left out."""
    anns = [a for a in full.annotations_on_frame(video_id, t) if not a["iscrowd"]]
    if not anns:
        return np.zeros((0, *shape), bool), np.zeros(0, np.int64)
    masks = mask_utils.decode([a["rle"] for a in anns]).transpose(2, 0, 1)
    masks = resize_masks(np.ascontiguousarray(masks), shape).astype(bool)
    return masks, np.asarray([a["label"] for a in anns], np.int64)


@torch.no_grad()
def pseudo_quality(cfg: Config, model: torch.nn.Module, full_json: str, thresholds: list[float] | None = None,
                   max_videos: int | None = None, iou: float = 0.5, on_frame: Callable | None = None) -> dict[str, Any]:
    """Score ``model``'s pseudo-labels on ``cfg.data.train_json`` against ``full_json``.

    ``cfg.pseudo`` is the filter; ``thresholds`` adds variants that differ only in
    ``pseudo.score_threshold``. Returns ``{"videos", "frames", "gt_instances", "variants":
    {"score_threshold=X": summary}}`` (summary: see ``_Tally.summary``). ``on_frame(video_id, t,
    image, gt_masks, gt_labels, pseudo, kinds)`` sees every scored frame with ``cfg.pseudo``'s
    pseudo-labels and their ``label_kinds`` (``--render``: svis_ray.pictures.PseudoLabelGallery).
    """
    sparse = load_split(cfg.data.root, cfg.data.train_json)
    full = load_split(cfg.data.root, full_json)
    if sparse.class_names != full.class_names:
        raise SvisError(f"{full.source}: categories differ from {sparse.source}")
    model.eval()
    num_classes = model.config.num_classes
    if num_classes != len(full.class_names):
        raise SvisError(f"{full.source}: {len(full.class_names)} categories, the checkpoint has {num_classes}")
    device = next(model.parameters()).device
    values = sorted({cfg.pseudo.score_threshold, *(thresholds or [])})
    variants = {f"score_threshold={v:g}": replace(cfg.pseudo, score_threshold=v) for v in values}
    tallies = {name: _Tally() for name in variants}
    dcfg = DecodeConfig((cfg.data.min_size_test,), cfg.data.max_size_test, False, "fail", 0)
    videos = sparse.videos[:max_videos] if max_videos else sparse.videos
    frames = gt_instances = 0
    for video in videos:
        vid = video["id"]
        try:
            length = full.video(vid)["length"]
        except SvisError:
            raise SvisError(f"{full.source}: no video with id {vid}, which {sparse.source} has") from None
        if length != video["length"]:
            raise SvisError(f"{full.source}: video {vid} has {length} frames, {sparse.source} says {video['length']}")
        labelled = sparse.labelled_frames(vid)
        if not labelled:
            continue
        anchor = labelled[len(labelled) // 2]
        # The model sees one frame at a time, so every frame is decoded and run once and each
        # (anchor, t) clip is cut from the video's outputs; the anchor's ground truth rides along.
        row = {"clip_index": 0, "video_id": vid, "height": video["height"], "width": video["width"],
               "frame_idx": list(range(video["length"])),
               "paths": [resolve(cfg.data.root, "JPEGImages/" + name) for name in video["file_names"]],
               "gt_json": json.dumps([sparse.annotations_on_frame(vid, anchor) if t == anchor else None
                                      for t in range(video["length"])])}
        decoded = decode_clip(row, dcfg)
        image = decoded["image"]
        n, h, w = image.shape[:3]
        video_out = forward_frames(model, image, cfg.teacher.window, device)
        for t in range(n):
            if t in labelled:
                continue
            clip = sorted([anchor, t])
            slot = clip.index(t)
            outputs = {k: v[clip] for k, v in video_out.items()}
            gt_frame = np.full(len(decoded["gt_frame"]), clip.index(anchor))
            gt_masks, gt_labels = frame_gt(full, vid, t, (h, w))
            frames += 1
            gt_instances += len(gt_masks)
            for name, pcfg in variants.items():
                fp = pseudo_label_clip(outputs, (h, w), decoded["labelled"][clip], decoded["gt_masks"],
                                       gt_frame, decoded["gt_labels"], pcfg, image[clip],
                                       tracker=cfg.inference.tracker)[slot]
                if pcfg.reliability != "off" and reliability_weight(clip_reliability(
                        outputs, (h, w), decoded["labelled"][clip], decoded["gt_masks"], gt_frame,
                        decoded["gt_labels"], pcfg), pcfg) == 0.0:
                    # the clip trains nothing: its pseudo-labels count as not kept
                    tallies[name].dropped += len(fp.labels)
                    keep = np.zeros(len(fp.labels), bool)
                    fp = FramePseudo(fp.masks[keep], fp.labels[keep], fp.scores[keep], fp.anchored[keep], fp.candidates)
                correct, ious = match_frame(fp.masks, fp.labels, gt_masks, gt_labels, iou)
                kinds = label_kinds(fp.masks, fp.labels, gt_masks, gt_labels, iou)
                tallies[name].add(fp, correct, ious, abs(t - anchor), kinds)
                if on_frame is not None and pcfg == cfg.pseudo:
                    on_frame(vid, t, image[t], gt_masks, gt_labels, fp, kinds)
    if not frames:
        raise SvisError(f"{sparse.source}: no unlabelled frames to pseudo-label (is it a sparse split? "
                        f"see svis-ray sparsify)")
    return {"videos": len(videos), "frames": frames, "gt_instances": gt_instances, "iou": iou,
            "variants": {name: tally.summary(gt_instances) for name, tally in tallies.items()}}


def format_quality(report: dict[str, Any]) -> str:
    """A table: one line per variant."""
    def pct(v: float | None) -> str:
        return "  -  " if v is None else f"{100 * v:5.1f}"

    lines = [f"pseudo-labels of {report['frames']} unlabelled frames in {report['videos']} videos "
             f"({report['gt_instances']} ground-truth instances), correct at IoU >= {report['iou']:g}",
             f"{'variant':22s} {'prec':>5s} {'rec':>5s} {'kept':>6s} {'anch':>6s} {'p_anch':>6s} "
             f"{'p_free':>6s}  precision by distance from the labelled frame"]
    for name, s in report["variants"].items():
        dist = " ".join(f"{d}:{pct(p).strip()}" for d, p in s["precision_by_distance"].items())
        lines.append(f"{name:22s} {pct(s['precision'])} {pct(s['recall'])} {s['kept']:6d} {s['anchored']:6d} "
                     f"{pct(s['anchored_precision']):>6s} {pct(s['unanchored_precision']):>6s}  {dist}")
        wrong = {k: n for k, n in s.get("kinds", {}).items() if k != "correct"}
        if wrong or s.get("dropped_by_reliability"):
            lines.append(f"{'':22s} wrong by kind: " + (", ".join(f"{k} {n}" for k, n in wrong.items()) or "none")
                         + (f"; {s['dropped_by_reliability']} dropped by pseudo.reliability"
                            if s.get("dropped_by_reliability") else ""))
    return "\n".join(lines)
