"""MinVIS inference: per-frame predictions linked into video tracks by query-embedding matching.

The student sees frames independently; a query that segments an object in one frame has a similar
embedding in the next, so Hungarian matching of embeddings between consecutive frames (no memory
bank) re-orders each frame's queries into the previous frame's order. After alignment, query slot
q is one track across the whole video.

Two trackers (``TRACKERS``, config key ``inference.tracker``, ``predict --tracker``):

- ``minvis``: MinVIS exactly: embedding cost only, every track keeps its mask on every frame.
- ``svis``: two departures, validated on the demo data only. The matching cost also charges
  (1 - mask IoU) between the two frames' masks (weight ``MASK_WEIGHT``): two objects of one class
  can have near-identical embeddings, and pure embedding matching then swaps them; objects move
  little between frames, so overlap settles it. And a track's mask is emptied on frames where its
  query predicts no-object with probability > ``ABSENT_THRESHOLD``: when an object leaves the
  frame its slot is still matched to *some* query, often one on another object; YouTube-VIS marks
  the absent frames null, so keeping those masks only adds false-positive pixels to the track.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from svis_ray.errors import SvisError
from svis_ray.model.minvis import preprocess_frames

ABSENT_THRESHOLD = 0.97  # only confident no-object: weak models are unsure far from their labels
MASK_WEIGHT = 2.0  # as large as the embedding cost's range (0..2), so overlap can outvote it


@dataclass(frozen=True)
class Tracker:
    """How frames are linked: ``mask_weight`` x (1 - mask IoU) added to the embedding cost, and
    masks emptied where no-object probability > ``absent_threshold`` (1 = never)."""

    mask_weight: float
    absent_threshold: float


TRACKERS = {"minvis": Tracker(mask_weight=0.0, absent_threshold=1.0),
            "svis": Tracker(mask_weight=MASK_WEIGHT, absent_threshold=ABSENT_THRESHOLD)}


def get_tracker(name: str | Tracker) -> Tracker:
    """``TRACKERS[name]`` (a ``Tracker`` passes through); SvisError for an unknown name."""
    if isinstance(name, Tracker):
        return name
    if name not in TRACKERS:
        raise SvisError(f"unknown tracker {name!r} (choose {', '.join(TRACKERS)})")
    return TRACKERS[name]


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of two sets of boolean masks: a [N, H, W], b [M, H, W] -> [N, M] float."""
    a, b = a.flatten(1).float(), b.flatten(1).float().to(a.device)
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1) - inter
    return inter / union.clamp(min=1)


def match_embeddings(prev: Tensor, cur: Tensor, prev_masks: Tensor | None = None,
                     cur_masks: Tensor | None = None, mask_weight: float = MASK_WEIGHT) -> Tensor:
    """Assign current queries to previous query slots by cosine similarity (and mask overlap).

    prev: [Q, C], cur: [Q, C] embeddings; prev_masks, cur_masks: optional [Q, h, w] mask logits.
    Returns perm [Q] (int64) such that ``cur[perm]`` is aligned to prev.
    """
    prev = F.normalize(prev.float(), dim=-1)
    cur = F.normalize(cur.float(), dim=-1)
    cost = 1 - prev @ cur.T  # [Q_prev, Q_cur]
    if prev_masks is not None and cur_masks is not None and mask_weight:
        cost = cost + mask_weight * (1 - mask_iou(prev_masks > 0, cur_masks > 0)).to(cost.device)
    _, perm = linear_sum_assignment(cost.cpu().numpy())  # rows come back sorted 0..Q-1
    return torch.as_tensor(perm, dtype=torch.int64)


def _windows(frames: Iterable[np.ndarray], window: int) -> Iterator[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == window:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def track_video(model: nn.Module | Callable[[Tensor], dict], frames: Iterable[np.ndarray], window: int = 30,
                topk: int = 10, out_size: tuple[int, int] | None = None, device: torch.device | str | None = None,
                tracker: str | Tracker = "minvis") -> list[dict]:
    """Segment and track the instances of one video.

    model: a ``MinVIS`` (run in eval mode) or any callable with its contract for ``pred_logits``,
    ``pred_masks`` and ``pred_embds``, e.g. ``deploy.OnnxModel`` (then ``device`` defaults to the CPU).
    frames: T uint8 RGB arrays [h, w, 3], all the same size (already resized for inference); each
    window goes through ``preprocess_frames`` (normalise, then zero-pad to /32).
    out_size: (H, W) of the returned masks, normally the original frame size; default (h, w).
    Returns up to ``topk`` tracks, best first: ``score`` (float), ``label`` (contiguous class
    index), ``query`` (its query slot, in the first frame's order) and ``masks`` (bool [T, H, W]).
    The same query may appear twice with different labels.
    ``tracker``: a ``TRACKERS`` name or a ``Tracker`` (see the module docstring).

    Memory: the model runs on ``window`` frames at a time, so device memory is bounded by one
    window. Across the video only the aligned low-res mask logits are kept per frame (on the
    CPU, T x Q x h/4 x w/4 floats), plus a running logit sum and the previous frame's
    embeddings, because the top-k tracks are known only after the last frame.
    """
    module = isinstance(model, nn.Module)
    if device is None:
        device = next(model.parameters()).device if module else "cpu"
    device = torch.device(device)
    track = get_tracker(tracker)
    was_training = module and model.training
    if module:
        model.eval()

    logit_sum = None  # [Q, K+1], sum over frames of the aligned class logits
    prev_embds = prev_masks = None  # [Q, C] and [Q, h/4, w/4], aligned, of the previous frame
    masks_lowres: list[Tensor] = []  # per frame [Q, h/4, w/4] aligned mask logits (CPU)
    absent: list[Tensor] = []  # per frame [Q] bool: the query predicts no-object
    h = w = 0
    try:
        for chunk in _windows(frames, window):
            if not masks_lowres:
                h, w = chunk[0].shape[:2]
            if any(f.shape != (h, w, 3) for f in chunk):
                shapes = [f.shape for f in chunk]
                raise ValueError(f"frames must all be {h}x{w}x3 RGB, got {shapes}")
            x = preprocess_frames(chunk, device)
            padded = tuple(x.shape[-2:])
            outputs = model(x)
            for logits, masks, embds in zip(outputs["pred_logits"], outputs["pred_masks"],
                                            outputs["pred_embds"]):
                # The first frame fixes the query order; later frames follow the previous one.
                perm = (torch.arange(len(embds)) if prev_embds is None
                        else match_embeddings(prev_embds, embds, prev_masks, masks, track.mask_weight)).to(embds.device)
                logits, masks, prev_embds = logits[perm].float(), masks[perm], embds[perm]
                prev_masks = masks
                logit_sum = logits if logit_sum is None else logit_sum + logits
                masks_lowres.append(masks.float().cpu())
                absent.append((logits.softmax(-1)[:, -1] > track.absent_threshold).cpu())
    finally:
        if module:
            model.train(was_training)
    if logit_sum is None:
        return []

    # Average logits before the softmax (as MinVIS), then rank every (query, class) pair.
    scores = (logit_sum / len(masks_lowres)).softmax(-1)[:, :-1].cpu()  # [Q, K]
    num_classes = scores.shape[1]
    top_scores, top_idx = scores.flatten().topk(min(topk, scores.numel()))
    queries = top_idx // num_classes
    labels = top_idx % num_classes

    out_h, out_w = out_size if out_size is not None else (h, w)
    video_masks = torch.empty(len(queries), len(masks_lowres), out_h, out_w, dtype=torch.bool)
    for t, frame_masks in enumerate(masks_lowres):
        m = F.interpolate(frame_masks[queries][None], size=padded, mode="bilinear",
                          align_corners=False)[:, :, :h, :w]
        m = F.interpolate(m, size=(out_h, out_w), mode="bilinear", align_corners=False)
        video_masks[:, t] = (m[0] > 0) & ~absent[t][queries, None, None]
    return [{"score": float(s), "label": int(c), "query": int(q), "masks": m.numpy()}
            for s, c, q, m in zip(top_scores, labels, queries, video_masks)]


def tracks_to_results(tracks: list[dict], video_id: int, idx_to_cat: dict[int, int]) -> list[dict]:
    """YouTube-VIS ``results.json`` records, one per track, with one compressed RLE per frame."""
    results = []
    for track in tracks:
        segmentations = []
        for mask in track["masks"]:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            segmentations.append(rle)
        results.append({"video_id": video_id, "category_id": idx_to_cat[track["label"]],
                        "score": track["score"], "segmentations": segmentations})
    return results
