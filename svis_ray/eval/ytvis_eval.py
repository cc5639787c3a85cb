"""YouTube-VIS video mask AP, numerically identical to the official ``ytvoseval.py``.

The official evaluator is COCOeval with images replaced by videos and masks by tubes:

* tube IoU = sum over frames of intersections / sum over frames of unions, where a frame with
  only a prediction or only a ground truth adds that mask to the union;
* the area of a tube (for the small/medium/large ranges) is the mean of its non-null, non-zero
  per-frame areas: the ``areas`` field for ground truth, the RLE areas for predictions;
* crowd ground truth is plain-IoU matched but ignored, and can absorb any number of predictions;
* predictions are sorted by score per (video, category) and cut at 100.

Per-(video, category) matching is done here, in bulk; accumulation (101-point interpolated
precision) and the summary are pycocotools' own ``COCOeval.accumulate``/``summarize``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from svis_ray.errors import SvisError
from svis_ray.eval.results import validate_results
from svis_ray.io import read_json, write_json

AREA_RANGES = {"all": (0.0, 1e5**2), "small": (0.0, 128.0**2),
               "medium": (128.0**2, 256.0**2), "large": (256.0**2, 1e5**2)}
MAX_DETS = (1, 10, 100)
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")  # COCOeval.stats[0:8]


@dataclass
class _Tube:
    rles: list[dict | None]  # one compressed RLE per frame, None where absent
    pixels: np.ndarray  # [T] mask area per frame, 0 where absent
    avg_area: float  # the area-range key (see module docstring)
    category: int
    score: float = 1.0  # predictions only
    crowd: bool = False  # ground truth only


def _mean_nonzero(areas: list) -> float:
    # ytvoseval: `[a for a in areas if a]`, mean, 0 when empty
    kept = [a for a in areas if a]
    return float(np.asarray(kept, dtype=np.float64).mean()) if kept else 0.0


def _frame_pixels(rles: list[dict | None]) -> np.ndarray:
    present = [i for i, r in enumerate(rles) if r is not None]
    pixels = np.zeros(len(rles), dtype=np.int64)
    if present:
        pixels[present] = mask_utils.area([rles[i] for i in present])
    return pixels


def _check_gt(gt: object, source: str) -> None:
    """The structure the evaluator indexes; full GT validation lives in svis_ray.data.ytvis."""
    if not isinstance(gt, dict):
        raise SvisError(f"{source}: expected a YTVIS JSON object, got {type(gt).__name__}")
    for key in ("videos", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise SvisError(f"{source}: missing or non-list '{key}'")
    if not gt["annotations"]:
        raise SvisError(f"{source}: no annotations; valid/test JSONs carry no annotations "
                        "— evaluation needs a labelled split")
    for what, items, keys in (("video", gt["videos"], ("id", "height", "width", "length")),
                              ("category", gt["categories"], ("id", "name"))):
        for i, item in enumerate(items):
            missing = [k for k in keys if not isinstance(item, dict) or k not in item]
            if missing:
                raise SvisError(f"{source}: {what} {i}: missing key '{missing[0]}'")


def _gt_rle(seg: object, h: int, w: int) -> dict | None:
    """ytvoseval's annToRLE: polygon or uncompressed RLE -> compressed RLE; falsy -> absent."""
    if not seg:
        return None
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(seg, h, w)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        return seg
    raise ValueError("not a polygon list or an RLE")


def _load_gt(gt: dict, source: str) -> dict[int, list[_Tube]]:
    """Ground-truth tubes per video, in annotation order (the order ytvoseval matches them in)."""
    videos = {v["id"]: v for v in gt["videos"]}
    categories = {c["id"] for c in gt["categories"]}
    tubes: dict[int, list[_Tube]] = defaultdict(list)
    for i, ann in enumerate(gt["annotations"]):
        where = f"{source}: annotation {i}"
        if not isinstance(ann, dict) or any(k not in ann for k in ("video_id", "category_id",
                                                                   "segmentations", "areas")):
            raise SvisError(f"{where}: needs video_id, category_id, segmentations and areas")
        video = videos.get(ann["video_id"])
        if video is None:
            raise SvisError(f"{where}: unknown video_id {ann['video_id']!r}")
        if ann["category_id"] not in categories:
            raise SvisError(f"{where}: unknown category_id {ann['category_id']!r}")
        segs, areas = ann["segmentations"], ann["areas"]
        if not isinstance(segs, list) or len(segs) != video["length"]:
            raise SvisError(f"{where}: segmentations must list {video['length']} frames")
        if not isinstance(areas, list) or not all(a is None or isinstance(a, (int, float)) for a in areas):
            raise SvisError(f"{where}: areas must be a list of numbers or nulls")
        h, w = video["height"], video["width"]
        rles = []
        for t, seg in enumerate(segs):
            try:
                rle = _gt_rle(seg, h, w)
            except Exception as e:  # pycocotools raises bare Exceptions on malformed input
                raise SvisError(f"{where}: frame {t}: bad segmentation ({e})") from None
            if rle is not None and list(rle["size"]) != [h, w]:
                raise SvisError(f"{where}: frame {t}: mask size {list(rle['size'])} differs from "
                                f"the video's [{h}, {w}]")
            rles.append(rle)
        tubes[ann["video_id"]].append(_Tube(rles, _frame_pixels(rles), _mean_nonzero(areas),
                                            ann["category_id"], crowd=bool(ann.get("iscrowd", 0))))
    return tubes


def _load_dets(results: list[dict]) -> dict[int, list[_Tube]]:
    """Predicted tubes per video: per category, the 100 best by score (stable, so ties keep file order)."""
    grouped: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in results:
        grouped[r["video_id"], r["category_id"]].append(r)
    tubes: dict[int, list[_Tube]] = defaultdict(list)
    for (vid, cat), records in grouped.items():
        order = np.argsort([-r["score"] for r in records], kind="mergesort")[: MAX_DETS[-1]]
        for j in order:
            rles = records[j]["segmentations"]
            pixels = _frame_pixels(rles)
            present = [pixels[t] for t, r in enumerate(rles) if r is not None]
            tubes[vid].append(_Tube(rles, pixels, _mean_nonzero(present), cat, float(records[j]["score"])))
    return tubes


def _tube_ious(dts: list[_Tube], gts: list[_Tube], num_frames: int) -> np.ndarray:
    """Spatio-temporal IoU matrix [D, G], exact: integer pixel counts summed over frames."""
    inter = np.zeros((len(dts), len(gts)), dtype=np.int64)
    for t in range(num_frames):
        di = [i for i, d in enumerate(dts) if d.rles[t] is not None]
        gi = [j for j, g in enumerate(gts) if g.rles[t] is not None]
        if not di or not gi:
            continue
        # Flagging every gt as crowd makes mask.iou return intersection / det area, from which
        # the integer intersection is recovered exactly; one C call per frame, not one per pair.
        frac = np.asarray(mask_utils.iou([dts[i].rles[t] for i in di], [gts[j].rles[t] for j in gi],
                                         [1] * len(gi)))
        det_px = np.array([dts[i].pixels[t] for i in di], dtype=np.float64)
        inter[np.ix_(di, gi)] += np.rint(frac * det_px[:, None]).astype(np.int64)
    union = (np.array([d.pixels.sum() for d in dts], dtype=np.int64)[:, None]
             + np.array([g.pixels.sum() for g in gts], dtype=np.int64)[None, :] - inter)
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def _match(ious: np.ndarray, gt_ignore: np.ndarray, crowd: np.ndarray,
           thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO greedy matching of score-sorted dets to gts at every IoU threshold at once.

    Returns ``matched`` and ``on_ignored`` (matched to an ignored gt), both [T, D].
    """
    num_dets, num_gts = ious.shape
    matched = np.zeros((len(thresholds), num_dets), dtype=bool)
    on_ignored = np.zeros_like(matched)
    if num_gts == 0:
        return matched, on_ignored
    taken = np.zeros((len(thresholds), num_gts), dtype=bool)
    rows = np.arange(len(thresholds))
    for d in range(num_dets):
        eligible = (~taken | crowd) & (ious[d] >= thresholds[:, None])
        # a det falls back to an ignored gt only when no regular gt is eligible
        for pool in (~gt_ignore, gt_ignore):
            cand = np.where(eligible & pool, ious[d], -1.0)
            # ytvoseval replaces its best on ties, so the last gt with the highest IoU wins
            best = num_gts - 1 - np.argmax(cand[:, ::-1], axis=1)
            hit = (cand[rows, best] >= 0) & ~matched[:, d]
            matched[hit, d] = True
            on_ignored[hit, d] = gt_ignore[best[hit]]
            taken[rows[hit], best[hit]] = True
    return matched, on_ignored


def _evaluate_video_category(ious: np.ndarray, dts: list[_Tube], gts: list[_Tube],
                             area: tuple[float, float], thresholds: np.ndarray) -> dict:
    """One COCOeval ``evalImgs`` entry (the fields ``accumulate`` reads)."""
    lo, hi = area
    crowd = np.array([g.crowd for g in gts], dtype=bool)
    gt_avg = np.array([g.avg_area for g in gts])
    dt_out = np.array([d.avg_area < lo or d.avg_area > hi for d in dts], dtype=bool)
    gt_ignore = crowd | (gt_avg < lo) | (gt_avg > hi)
    matched, on_ignored = _match(ious, gt_ignore, crowd, thresholds)
    return {
        "dtScores": [d.score for d in dts],
        "dtMatches": matched,
        # unmatched detections outside the area range do not count as false positives
        "dtIgnore": on_ignored | (~matched & dt_out[None, :]),
        "gtIgnore": gt_ignore,
    }


def evaluate(gt: dict, results: list[dict], *, gt_source: str = "ground truth",
             results_source: str = "results") -> dict:
    """YouTube-VIS mask AP of ``results`` (CodaLab records) against the YTVIS ground truth ``gt``.

    Returns fractions keyed ``AP, AP50, AP75, APs, APm, APl, AR1, AR10`` plus
    ``per_category: {name: AP}``; a metric with no ground truth in its area range is -1 (COCO).
    The sources name the inputs in error messages.
    """
    _check_gt(gt, gt_source)
    validate_results(results, gt, results_source)
    gt_tubes = _load_gt(gt, gt_source)
    dt_tubes = _load_dets(results)

    coco = COCOeval(iouType="segm")
    p = coco.params
    p.imgIds = sorted({v["id"] for v in gt["videos"]})
    p.catIds = sorted({c["id"] for c in gt["categories"]})
    p.areaRng = [list(r) for r in AREA_RANGES.values()]
    p.areaRngLbl = list(AREA_RANGES)
    p.maxDets = list(MAX_DETS)
    cat_index = {c: k for k, c in enumerate(p.catIds)}
    num_areas, num_videos = len(p.areaRng), len(p.imgIds)

    # evalImgs is indexed [category][area][video]; None where a pair has neither gt nor dets
    eval_imgs: list[dict | None] = [None] * (len(p.catIds) * num_areas * num_videos)
    lengths = {v["id"]: v["length"] for v in gt["videos"]}
    for i, vid in enumerate(p.imgIds):
        gts, dts = gt_tubes.get(vid, []), dt_tubes.get(vid, [])
        if not gts and not dts:
            continue
        ious = _tube_ious(dts, gts, lengths[vid])
        for cat in {t.category for t in gts + dts}:
            gi = [j for j, g in enumerate(gts) if g.category == cat]
            di = [j for j, d in enumerate(dts) if d.category == cat]
            pair_ious = ious[np.ix_(di, gi)]
            for a, area in enumerate(AREA_RANGES.values()):
                eval_imgs[(cat_index[cat] * num_areas + a) * num_videos + i] = _evaluate_video_category(
                    pair_ious, [dts[j] for j in di], [gts[j] for j in gi], area, p.iouThrs)

    coco.evalImgs = eval_imgs
    coco._paramsEval = copy.deepcopy(p)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary
        coco.accumulate()
        coco.summarize()

    metrics: dict = {key: float(coco.stats[i]) for i, key in enumerate(SUMMARY_KEYS)}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    precision = coco.eval["precision"]  # [T, R, K, A, M]
    metrics["per_category"] = {}
    for k, cat in enumerate(p.catIds):
        s = precision[:, :, k, 0, -1]
        metrics["per_category"][names[cat]] = float(s[s > -1].mean()) if (s > -1).any() else -1.0
    return metrics


def evaluate_files(gt_path: str | os.PathLike, results_path: str | os.PathLike,
                   out: str | os.PathLike | None = None) -> dict:
    """Evaluate a results.json against a YTVIS ground-truth JSON; write the metrics JSON to ``out``."""
    gt = read_json(gt_path, "ground-truth JSON")
    results = read_json(results_path, "results file")
    metrics = evaluate(gt, results, gt_source=str(gt_path), results_source=str(results_path))
    if out is not None:
        write_json(out, metrics, indent=2)
    return metrics


def format_table(metrics: dict) -> str:
    """Summary metrics and per-category AP in percent, one decimal; '-' where undefined (-1)."""
    def pct(v: float) -> str:
        return "-" if v < 0 else f"{100 * v:.1f}"

    names = list(metrics["per_category"])
    width = max([len("category"), *map(len, names)])
    lines = [f"{'metric':<{width}}  {'value':>6}"]
    lines += [f"{key:<{width}}  {pct(metrics[key]):>6}" for key in SUMMARY_KEYS]
    lines += ["", f"{'category':<{width}}  {'AP':>6}"]
    lines += [f"{name:<{width}}  {pct(ap):>6}" for name, ap in metrics["per_category"].items()]
    return "\n".join(lines)
