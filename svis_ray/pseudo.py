"""Pseudo-labels for unlabelled frames: filtering and ground-truth anchoring.

Sparse-MinVIS keeps, per unlabelled frame, the top-k (query, class) pairs whose class score
exceeds 0.8, masks at logit 0. svis-ray adds *anchoring*: the teacher tracks the clip with the
run's tracker (``inference.tracker``), and a track whose mask matches a ground-truth instance on the clip's labelled
frame (mask IoU >= ``anchor_iou``) takes that instance's class and is kept at the lower
foreground-score threshold ``anchor_score_threshold`` -- the annotation vouches for the object,
the teacher only has to follow it. Unanchored tracks must pass the normal threshold.
Optionally (``nms_iou`` < 1), a class-agnostic mask NMS keeps one pseudo-label per object,
anchored ones first: on the demo data a third of the wrong pseudo-labels were a second query on
an object already labelled. Optionally (``refine="grabcut"``), each kept mask is snapped to the
frame's colour edges: the model predicts masks at 1/4 of the input resolution.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.transforms import v2

from svis_ray.config import PseudoConfig
from svis_ray.tracking import get_tracker, mask_iou, match_embeddings


@dataclass
class FramePseudo:
    """Pseudo-labels of one frame: masks bool [P,H,W], labels int64 [P], scores float32 [P], anchored bool [P]."""

    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    anchored: np.ndarray
    candidates: int  # (query, class) pairs considered, for the acceptance rate


def select_frame(logits: torch.Tensor, masks: torch.Tensor, cfg: PseudoConfig,
                 anchors: dict[int, int] | None = None, image: np.ndarray | None = None) -> FramePseudo:
    """Filter one frame's predictions.

    Args:
        logits: [Q, K+1] class logits (last = no-object).
        masks: [Q, H, W] mask logits at the target resolution.
        anchors: query index -> contiguous class of the ground-truth instance it was anchored to.
        image: uint8 [H, W, 3], the frame; needed when ``cfg.refine`` is not ``"none"``.
    """
    probs = logits.float().softmax(-1)
    num_classes = probs.shape[1] - 1
    anchors = anchors or {}
    keep_q, keep_c, keep_s, keep_a = [], [], [], []
    for q, c in anchors.items():
        fg = 1.0 - float(probs[q, -1])
        if fg >= cfg.anchor_score_threshold:
            keep_q.append(q), keep_c.append(c), keep_s.append(fg), keep_a.append(True)
    # Unanchored candidates: top-k over the flattened (query, class) grid, as MinVIS inference.
    cls = probs[:, :-1].clone()
    if anchors:
        cls[list(anchors)] = -1.0
    k = min(cfg.topk, cls.numel())
    scores, flat = cls.flatten().topk(k)
    for s, i in zip(scores.tolist(), flat.tolist()):
        if s > cfg.score_threshold:
            keep_q.append(i // num_classes), keep_c.append(i % num_classes), keep_s.append(s), keep_a.append(False)
    h, w = masks.shape[-2:]
    if keep_q:
        m = (masks[keep_q] > cfg.mask_threshold).cpu().numpy()
    else:
        m = np.zeros((0, h, w), bool)
    keep_s, keep_a = np.asarray(keep_s, np.float32), np.asarray(keep_a, bool)
    keep = m.reshape(len(m), h * w).sum(1) >= cfg.min_area
    if cfg.nms_iou < 1.0:
        keep[keep] = nms(m[keep], keep_a[keep], keep_s[keep], cfg.nms_iou)
    m = m[keep]
    if cfg.refine == "grabcut":
        if image is None:
            raise ValueError("pseudo.refine=grabcut needs the frame's image")
        m = np.stack([grabcut(image, mask, cfg.min_area) for mask in m]) if len(m) else m
    return FramePseudo(
        masks=m,
        labels=np.asarray(keep_c, np.int64)[keep],
        scores=keep_s[keep],
        anchored=keep_a[keep],
        candidates=k + len(anchors),
    )


def nms(masks: np.ndarray, anchored: np.ndarray, scores: np.ndarray, max_iou: float) -> np.ndarray:
    """Greedy class-agnostic mask NMS: bool [P], False for a mask overlapping an earlier-kept one
    at IoU >= ``max_iou``. Anchored pseudo-labels come first (the annotation vouches for them),
    then by score. masks: bool [P,H,W]; anchored: bool [P]; scores: [P]."""
    iou = mask_iou(torch.from_numpy(masks), torch.from_numpy(masks)).numpy()
    keep = np.zeros(len(masks), bool)
    for i in np.lexsort((-scores, ~anchored)):  # primary key last: anchored first, then score
        keep[i] = not (iou[i, keep] >= max_iou).any()
    return keep


# GrabCut seeds: the mask is probable foreground, a band of GRABCUT_BAND pixels around it probable
# background, everything further away background (other objects included: they teach the
# background colour model). 3 pixels and 3 iterations gave the best mean IoU on the demo data
# (README, Results); a wider band or more iterations did not help. No "sure foreground": the
# teacher's mask may cover a ring's hole or a star's gaps.
GRABCUT_BAND = 3
GRABCUT_ITERS = 3
_SQUARE = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))


def grabcut(image: np.ndarray, mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` (bool [H,W]) snapped to ``image``'s (uint8 [H,W,3]) colour edges by GrabCut.

    Returns the teacher's own mask where GrabCut cannot improve on it: a mask too small to seed
    a colour model, a result under ``min_area`` pixels, or a frame GrabCut rejects (one colour).
    """
    if image.shape[:2] != mask.shape:
        raise ValueError(f"grabcut: image {image.shape[:2]} and mask {mask.shape} differ in size")
    if mask.sum() < min_area:
        return mask
    seeds = np.full(mask.shape, cv2.GC_BGD, np.uint8)
    seeds[cv2.dilate(mask.astype(np.uint8), _SQUARE, iterations=GRABCUT_BAND) > 0] = cv2.GC_PR_BGD
    seeds[mask] = cv2.GC_PR_FGD
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    try:
        cv2.grabCut(np.ascontiguousarray(image), seeds, None, bgd, fgd, GRABCUT_ITERS, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # e.g. no background left to learn from, or a one-colour frame
        return mask
    out = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    return out if out.sum() >= min_area else mask


def anchor_queries(pred_masks: torch.Tensor, gt_masks: torch.Tensor, gt_labels: torch.Tensor,
                   min_iou: float) -> dict[int, int]:
    """Match a frame's predicted masks to its ground truth by mask IoU (Hungarian).

    Args:
        pred_masks: [Q, H, W] bool. gt_masks: [M, H, W] bool. gt_labels: [M].
    Returns: query index -> ground-truth class for pairs with IoU >= ``min_iou``.
    """
    if len(gt_masks) == 0:
        return {}
    iou = mask_iou(pred_masks, gt_masks).cpu().numpy()
    rows, cols = linear_sum_assignment(-iou)
    return {int(q): int(gt_labels[m]) for q, m in zip(rows, cols) if iou[q, m] >= min_iou}


def pseudo_label_clip(outputs: dict[str, torch.Tensor], size: tuple[int, int], labelled: np.ndarray,
                      gt_masks: np.ndarray, gt_frame: np.ndarray, gt_labels: np.ndarray,
                      cfg: PseudoConfig, images: np.ndarray | None = None,
                      tracker: str = "minvis") -> list[FramePseudo | None]:
    """Pseudo-labels for the unlabelled frames of one clip (frames in temporal order).

    Args:
        outputs: model outputs for the clip's F frames: ``pred_logits`` [F,Q,K+1],
            ``pred_masks`` [F,Q,h/4,w/4] (padded input), ``pred_embds`` [F,Q,C].
        size: (h, w) of the frames before padding.
        labelled: bool [F]; gt_masks uint8 [M,h,w], gt_frame int [M], gt_labels int [M].
        images: uint8 [F,h,w,3], the clip's frames; needed when ``cfg.refine`` is not ``"none"``.
        tracker: how the clip's frames are linked for anchoring (``tracking.TRACKERS``).
    Returns: one ``FramePseudo`` per frame, ``None`` for labelled frames.
    """
    mask_weight = get_tracker(tracker).mask_weight
    logits, mask_logits, embds = outputs["pred_logits"], outputs["pred_masks"], outputs["pred_embds"]
    num_frames = logits.shape[0]
    # Track: permute each frame's queries into the first frame's order (the tracker's matching).
    order = [torch.arange(logits.shape[1], device=logits.device)]
    for f in range(1, num_frames):
        perm = match_embeddings(embds[f - 1][order[-1]], embds[f],
                                mask_logits[f - 1][order[-1]], mask_logits[f], mask_weight)
        order.append(perm.to(logits.device))
    h, w = size
    full = F.interpolate(mask_logits.float(), scale_factor=4, mode="bilinear", align_corners=False)[..., :h, :w]
    anchors: dict[int, int] = {}
    if cfg.anchor:
        for f in np.flatnonzero(labelled):
            sel = gt_frame == f
            aligned = full[f][order[f]] > cfg.mask_threshold
            gm = torch.tensor(gt_masks[sel], device=aligned.device).bool()
            for q, c in anchor_queries(aligned, gm, torch.tensor(gt_labels[sel]), cfg.anchor_iou).items():
                anchors.setdefault(q, c)  # the first labelled frame wins on conflict
    result: list[FramePseudo | None] = []
    for f in range(num_frames):
        if labelled[f]:
            result.append(None)
            continue
        # Anchors are in track (first-frame) order; map them to this frame's raw query index.
        frame_anchors = {int(order[f][q]): c for q, c in anchors.items()}
        result.append(select_frame(logits[f], full[f], cfg, frame_anchors, None if images is None else images[f]))
    return result


def frame_reliability(logits: torch.Tensor, masks: torch.Tensor, gt_masks: torch.Tensor, gt_labels: np.ndarray,
                      cfg: PseudoConfig) -> float:
    """How well the teacher labels a frame whose ground truth is known, in [0, 1].

    Args:
        logits: [Q, K+1] class logits; masks: [Q, H, W] mask logits at the frame's size.
        gt_masks: bool [M, H, W]; gt_labels: [M] contiguous classes.
    The teacher's confident predictions (``select_frame`` without anchors or refinement: what it
    would keep on an unlabelled frame) are matched one-to-one to the ground truth by mask IoU,
    same class only; the summed IoU of the pairs is divided by max(M, predictions), so missed
    objects, wrong classes, poor masks and false positives all lower it. 1 when both are empty.
    """
    fp = select_frame(logits, masks, dataclasses.replace(cfg, refine="none"))
    m, p = len(gt_masks), len(fp.labels)
    if m == 0 and p == 0:
        return 1.0
    if m == 0 or p == 0:
        return 0.0
    iou = mask_iou(torch.from_numpy(fp.masks), gt_masks.bool().cpu()).numpy()
    same = iou * (fp.labels[:, None] == np.asarray(gt_labels)[None])
    rows, cols = linear_sum_assignment(-same)
    return float(same[rows, cols].sum() / max(m, p))


def clip_reliability(outputs: dict[str, torch.Tensor], size: tuple[int, int], labelled: np.ndarray,
                     gt_masks: np.ndarray, gt_frame: np.ndarray, gt_labels: np.ndarray, cfg: PseudoConfig) -> float:
    """Mean ``frame_reliability`` over the clip's labelled frames (arguments as in
    ``pseudo_label_clip``); 1.0 for a clip without one (nothing to check against)."""
    h, w = size
    scores = []
    for f in np.flatnonzero(labelled):
        full = F.interpolate(outputs["pred_masks"][f:f + 1].float(), scale_factor=4, mode="bilinear",
                             align_corners=False)[0, :, :h, :w]
        sel = gt_frame == f
        scores.append(frame_reliability(outputs["pred_logits"][f], full, torch.as_tensor(gt_masks[sel]).bool(),
                                        np.asarray(gt_labels)[sel], cfg))
    return float(np.mean(scores)) if scores else 1.0


def reliability_weight(reliability: float, cfg: PseudoConfig) -> float:
    """The loss-weight factor of a clip's pseudo-labelled frames (``pseudo.reliability``)."""
    if cfg.reliability == "drop":
        return 1.0 if reliability >= cfg.reliability_min else 0.0
    if cfg.reliability == "weight":
        return float(np.clip(reliability, 0.0, 1.0))
    return 1.0


# Unbiased Teacher's photometric "strong" augmentation, without its geometric parts (cutout would
# erase objects the masks still claim).
STRONG_AUG = v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                         v2.RandomGrayscale(p=0.2),
                         v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5)])


def strong_augment(images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
    """A copy of ``images`` (uint8 [N,3,H,W], padded) with ``STRONG_AUG`` applied, inside each
    frame's ``size``, to the frames a teacher labelled (``pseudo`` with labels); other frames and
    the padding are unchanged. Random draws come from torch's global generator."""
    out = images.clone()
    for i, t in enumerate(targets):
        if t["pseudo"] and t["labels"] is not None:
            h, w = t["size"]
            out[i, :, :h, :w] = STRONG_AUG(images[i, :, :h, :w])
    return out
