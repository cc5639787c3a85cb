"""YouTube-VIS evaluator: hand-computed cases, validation, CLI, and a cross-check against a
slow, literal re-implementation of the official ytvoseval algorithm."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from svis_ray.errors import SvisError
from svis_ray.eval import encode_masks, evaluate, evaluate_files, format_table, read_results, write_results
from svis_ray.eval.ytvis_eval import SUMMARY_KEYS, _load_dets, _load_gt, _tube_ious

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def tube(boxes: list[Box | None], h: int, w: int) -> np.ndarray:
    m = np.zeros((len(boxes), h, w), dtype=bool)
    for t, b in enumerate(boxes):
        if b is not None:
            m[t, b[1]:b[3], b[0]:b[2]] = True
    return m


def rles(boxes: list[Box | None], h: int, w: int) -> list[dict | None]:
    enc = encode_masks(tube(boxes, h, w))
    return [r if b is not None else None for r, b in zip(enc, boxes)]


class Data:
    """Builds a YTVIS ground truth and a results list from boxes."""

    def __init__(self, categories: int = 2):
        self.gt = {"videos": [], "annotations": [], "info": {},
                   "categories": [{"id": c, "name": f"cat{c}"} for c in range(1, categories + 1)]}
        self.results: list[dict] = []

    def video(self, length: int, h: int = 32, w: int = 32) -> int:
        vid = len(self.gt["videos"]) + 1
        self.gt["videos"].append({"id": vid, "height": h, "width": w, "length": length,
                                  "file_names": [f"v{vid}/{t:05d}.jpg" for t in range(length)],
                                  "labelled_frames": [0]})
        return vid

    def _hw(self, vid: int) -> tuple[int, int]:
        v = self.gt["videos"][vid - 1]
        return v["height"], v["width"]

    def gt_tube(self, vid: int, cat: int, boxes: list[Box | None], iscrowd: int = 0) -> None:
        areas = [None if b is None else float((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]
        self.gt["annotations"].append({
            "id": len(self.gt["annotations"]) + 1, "video_id": vid, "category_id": cat,
            "segmentations": rles(boxes, *self._hw(vid)), "areas": areas,
            "bboxes": [None if b is None else [b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in boxes],
            "iscrowd": iscrowd})

    def det(self, vid: int, cat: int, boxes: list[Box | None], score: float) -> None:
        self.results.append({"video_id": vid, "category_id": cat, "score": score,
                             "segmentations": rles(boxes, *self._hw(vid))})


def test_perfect_predictions_score_one() -> None:
    d = Data(categories=3)
    for v in range(3):
        vid = d.video(length=4)
        for cat in (1, 2, 3):
            if (v + cat) % 3 == 0:
                continue  # not every category in every video
            x = 4 * cat + v
            boxes = [(x, 2, x + 6, 9), None, (x + 1, 3, x + 8, 10), (x, 2, x + 6, 9)]
            d.gt_tube(vid, cat, boxes)
            d.det(vid, cat, boxes, score=1.0)
    m = evaluate(d.gt, d.results)
    for key in ("AP", "AP50", "AP75", "APs", "AR1", "AR10"):
        assert m[key] == pytest.approx(1.0, abs=1e-12), key
    assert m["APm"] == -1 and m["APl"] == -1  # no medium/large ground truth
    assert m["per_category"] == pytest.approx({"cat1": 1.0, "cat2": 1.0, "cat3": 1.0}, abs=1e-12)


def test_tube_iou_counts_unpaired_frames_in_union() -> None:
    d = Data(categories=1)
    vid = d.video(length=4, h=10, w=10)
    # frame 0 overlaps (16 & 16 px, intersection 8), frame 1 prediction only (9 px),
    # frame 2 ground truth only (4 px), frame 3 neither
    d.det(vid, 1, [(0, 0, 4, 4), (0, 0, 3, 3), None, None], score=0.5)
    d.gt_tube(vid, 1, [(2, 0, 6, 4), None, (5, 5, 7, 7), None])
    ious = _tube_ious(_load_dets(d.results)[vid], _load_gt(d.gt, "gt")[vid], 4)
    assert ious.shape == (1, 1)
    assert ious[0, 0] == 8 / (24 + 9 + 4)


def test_unpaired_frames_lower_ap() -> None:
    d = Data(categories=1)
    vid = d.video(length=3)
    # 40 shared pixels, 3 prediction-only and 3 gt-only pixels: IoU 40/46 = 0.87, so the tube
    # matches at thresholds 0.50..0.85 (8 of 10); ignoring either unpaired frame gives >= 0.9
    d.gt_tube(vid, 1, [(0, 0, 8, 5), None, (0, 0, 3, 1)])
    d.det(vid, 1, [(0, 0, 8, 5), (0, 0, 3, 1), None], score=0.9)
    m = evaluate(d.gt, d.results)
    assert m["AP"] == pytest.approx(0.8, abs=1e-12)
    assert m["AP50"] == pytest.approx(1.0, abs=1e-12) and m["AP75"] == pytest.approx(1.0, abs=1e-12)


def test_crowd_is_ignored_and_plain_iou_matched() -> None:
    d = Data(categories=1)
    vid = d.video(length=2)
    person = [(0, 0, 6, 6)] * 2
    crowd = [(10, 10, 30, 30)] * 2
    d.gt_tube(vid, 1, person)
    d.gt_tube(vid, 1, crowd, iscrowd=1)
    d.det(vid, 1, [(12, 12, 16, 16)] * 2, score=0.99)  # inside the crowd but IoU 16/400
    d.det(vid, 1, crowd, score=0.95)  # on the crowd: ignored, and a crowd absorbs several
    d.det(vid, 1, person, score=0.9)
    d.det(vid, 1, crowd, score=0.8)
    m = evaluate(d.gt, d.results)
    # ytvoseval uses plain IoU for crowds (COCO images use intersection/det-area, which would
    # ignore the small det): ranking FP, (ignored), TP, (ignored) -> precision 1/2 at recall 1
    assert m["AP"] == pytest.approx(0.5, abs=1e-12)
    assert m["AR10"] == 1.0
    assert m["AR1"] == 0.0  # the single best det is the false positive


def test_area_ranges_use_mean_of_non_null_frame_areas() -> None:
    d = Data(categories=3)
    vid = d.video(length=3, h=400, w=400)
    small = [(0, 0, 100, 100), None, (0, 0, 100, 100)]  # 10000 px
    medium = [(0, 0, 150, 150), (0, 0, 150, 150), None]  # 22500 px
    large = [None, (0, 0, 300, 300), (0, 0, 300, 300)]  # 90000 px
    d.gt_tube(vid, 1, small)
    d.gt_tube(vid, 2, medium)
    d.gt_tube(vid, 3, large)
    d.det(vid, 1, small, score=0.9)
    d.det(vid, 2, [(200, 200, 350, 350), (200, 200, 350, 350), None], score=0.9)  # misses
    d.det(vid, 3, large, score=0.9)
    m = evaluate(d.gt, d.results)
    assert [m["APs"], m["APm"], m["APl"]] == pytest.approx([1.0, 0.0, 1.0], abs=1e-12)
    assert m["AP"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["per_category"] == pytest.approx({"cat1": 1.0, "cat2": 0.0, "cat3": 1.0}, abs=1e-12)

    # the ranges are closed: a false positive of exactly 128^2 px counts as small (and medium)
    d.det(vid, 1, [(250, 250, 378, 378)] * 3, score=0.95)
    m = evaluate(d.gt, d.results)
    assert m["APs"] == pytest.approx(0.5, abs=1e-12)


def test_gt_area_range_comes_from_areas_field() -> None:
    d = Data(categories=1)
    vid = d.video(length=2, h=64, w=64)
    d.gt_tube(vid, 1, [(0, 0, 10, 10)] * 2)  # 100 px masks...
    d.gt["annotations"][0]["areas"] = [70000.0, None]  # ...but the official key is this field
    d.det(vid, 1, [(0, 0, 10, 10)] * 2, score=0.9)
    m = evaluate(d.gt, d.results)
    assert m["APl"] == pytest.approx(1.0, abs=1e-12) and m["APs"] == -1


def test_equal_iou_goes_to_the_last_gt() -> None:
    d = Data(categories=1)
    vid = d.video(length=1)
    d.gt_tube(vid, 1, [(0, 0, 6, 4)])
    d.gt_tube(vid, 1, [(2, 0, 8, 4)])
    d.det(vid, 1, [(1, 0, 7, 4)], score=0.9)  # IoU 20/28 with both gts
    d.det(vid, 1, [(0, 0, 6, 4)], score=0.8)  # IoU 1 with the first gt, 0.5 with the second
    # ytvoseval keeps the last gt on equal IoU, leaving the first one to the second det: at
    # thresholds 0.50..0.70 both dets are true positives (AP 1; the first-gt rule would make the
    # second det a false positive from 0.55); from 0.75 the first det is a false positive ranked
    # above a true positive at recall 1/2 (precision 1/2 on the 51 recall points 0..0.5)
    m = evaluate(d.gt, d.results)
    assert m["AP"] == pytest.approx((5 * 1.0 + 5 * 0.5 * 51 / 101) / 10, abs=1e-12)


def test_detections_cut_at_100_per_video_and_category() -> None:
    d = Data(categories=2)
    vid = d.video(length=1, h=16, w=128)
    d.gt_tube(vid, 1, [(0, 0, 8, 8)])
    for i in range(100):
        d.det(vid, 1, [(10 + i, 10, 11 + i, 11)], score=0.5 + i / 1000)  # false positives
    d.det(vid, 2, [(0, 0, 8, 8)], score=0.99)  # another category: not part of the cut
    d.det(vid, 1, [(0, 0, 8, 8)], score=0.4)  # the true positive, ranked 101st
    assert evaluate(d.gt, d.results)["AP"] == 0.0
    d.results[-1]["score"] = 0.5005  # 100th of its category (101st of its video)
    assert evaluate(d.gt, d.results)["AP"] > 0.0


@pytest.mark.parametrize("tp_first", [True, False])
def test_score_ties_keep_file_order(tp_first: bool) -> None:
    d = Data(categories=1)
    vid = d.video(length=1, h=16, w=128)
    d.gt_tube(vid, 1, [(0, 0, 8, 8)])
    fps = [[(10 + i, 10, 11 + i, 11)] for i in range(100)]
    for boxes in ([[(0, 0, 8, 8)]] + fps if tp_first else fps + [[(0, 0, 8, 8)]]):
        d.det(vid, 1, boxes, score=0.5)
    # first in the file: ranked first; last: ranked 101st and cut
    assert evaluate(d.gt, d.results)["AP"] == pytest.approx(1.0 if tp_first else 0.0, abs=1e-12)


def test_hand_computed_ap() -> None:
    d = Data(categories=1)
    vid = d.video(length=2)
    g = [[(0, 0, 5, 5)] * 2, [(10, 0, 15, 5)] * 2, [(20, 0, 25, 5)] * 2]
    for boxes in g:
        d.gt_tube(vid, 1, boxes)
    d.det(vid, 1, g[0], score=0.9)  # TP
    d.det(vid, 1, [(0, 20, 5, 25)] * 2, score=0.8)  # FP
    d.det(vid, 1, g[1], score=0.7)  # TP; g[2] is missed
    # recall [1/3, 1/3, 2/3], interpolated precision [1, 2/3, 2/3]: recall points 0.00..0.33 get
    # 1, 0.34..0.66 get 2/3, 0.67..1.00 get 0
    m = evaluate(d.gt, d.results)
    assert m["AP"] == pytest.approx((34 + 33 * 2 / 3) / 101, abs=1e-12)
    assert m["AR1"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["AR10"] == pytest.approx(2 / 3, abs=1e-12)


def test_encode_masks_round_trip_and_results_file(tmp_path) -> None:
    masks = np.random.default_rng(0).random((3, 7, 9)) > 0.5
    enc = encode_masks(masks)
    assert [r["size"] for r in enc] == [[7, 9]] * 3 and all(isinstance(r["counts"], str) for r in enc)
    assert (mask_utils.decode(enc).transpose(2, 0, 1) == masks).all()
    d = Data(categories=1)
    vid = d.video(length=3, h=7, w=9)
    records = [{"video_id": vid, "category_id": 1, "score": 0.5, "segmentations": enc}]
    write_results(tmp_path / "r.json", records)
    assert read_results(tmp_path / "r.json", d.gt) == records


def _valid_case() -> Data:
    d = Data(categories=1)
    vid = d.video(length=2, h=8, w=8)
    d.gt_tube(vid, 1, [(0, 0, 4, 4), None])
    d.det(vid, 1, [(0, 0, 4, 4), None], score=0.5)
    return d


@pytest.mark.parametrize("corrupt, problem", [
    (lambda rs: rs[0].update(video_id=99), "unknown video_id 99"),
    (lambda rs: rs[0].update(category_id=7), "unknown category_id 7"),
    (lambda rs: rs[0]["segmentations"].append(None), "segmentations must list 2 frames"),
    (lambda rs: rs[0]["segmentations"][0].update(size=[8, 9]), "mask size [8, 9] differs"),
    (lambda rs: rs[0].update(score="high"), "score must be a finite number"),
    (lambda rs: rs[0].pop("score"), "missing key 'score'"),
    (lambda rs: rs.append(3), "expected an object"),
])
def test_invalid_results_name_file_and_record(tmp_path, corrupt, problem) -> None:
    d = _valid_case()
    corrupt(d.results)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(d.results))
    with pytest.raises(SvisError) as e:
        read_results(path, d.gt)
    msg = str(e.value)
    assert msg.startswith(f"{path}: record ") and problem in msg and "\n" not in msg


def test_results_not_a_list(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"video_id": 1}')
    with pytest.raises(SvisError, match=r"results\.json: expected a JSON list"):
        read_results(path, _valid_case().gt)


def test_gt_without_annotations_is_refused(tmp_path) -> None:
    d = _valid_case()
    d.gt["annotations"] = []
    gt_path, res_path = tmp_path / "valid.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(d.gt))
    res_path.write_text(json.dumps(d.results))
    with pytest.raises(SvisError, match=r"valid\.json: no annotations.*labelled split"):
        evaluate_files(gt_path, res_path)


def test_evaluate_files_writes_metrics_and_table(tmp_path) -> None:
    d = _valid_case()
    gt_path, res_path, out = tmp_path / "gt.json", tmp_path / "results.json", tmp_path / "m" / "metrics.json"
    gt_path.write_text(json.dumps(d.gt))
    res_path.write_text(json.dumps(d.results))
    m = evaluate_files(gt_path, res_path, out=out)
    assert json.loads(out.read_text()) == m and m["AP"] == pytest.approx(1.0, abs=1e-12)
    table = format_table(m)
    assert "AP50" in table and "100.0" in table
    assert [line.split() for line in table.splitlines() if line.startswith("APm")] == [["APm", "-"]]
    assert table.splitlines()[-1].split() == ["cat1", "100.0"]


def test_cli_bad_results_exits_2_with_one_line(tmp_path) -> None:
    d = _valid_case()
    d.results[0]["segmentations"].pop()
    gt_path, bad, out = tmp_path / "gt.json", tmp_path / "bad.json", tmp_path / "metrics.json"
    gt_path.write_text(json.dumps(d.gt))
    bad.write_text(json.dumps(d.results))
    p = subprocess.run([sys.executable, "-m", "svis_ray", "evaluate", "--gt", str(gt_path),
                        "--results", str(bad), "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"svis-ray: error: {bad}: record 0")
    assert "Traceback" not in p.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Reference: the official ytvoseval algorithm written out literally (per pair, per frame merges,
# per-threshold greedy loops, per-threshold accumulation), slow but obviously faithful.

def _ref_to_rle(seg, h, w):
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    return seg


def _ref_avg(areas):
    nonzero = [a for a in areas if a]
    return np.array(nonzero).mean() if nonzero else 0


def _ref_tube_iou(d_seq, g_seq):
    inter = union = 0.0
    for d, g in zip(d_seq, g_seq):
        if d and g:
            inter += mask_utils.area(mask_utils.merge([d, g], True))
            union += mask_utils.area(mask_utils.merge([d, g], False))
        elif g:
            union += mask_utils.area(g)
        elif d:
            union += mask_utils.area(d)
    return inter / union if union > 0 else 0.0


def reference_eval(gt: dict, results: list[dict]) -> dict:
    thrs = np.linspace(0.5, 0.95, 10)
    rec_thrs = np.linspace(0.0, 1.0, 101)
    area_rngs = [(0, 1e10), (0, 128**2), (128**2, 256**2), (256**2, 1e10)]
    max_dets = [1, 10, 100]
    videos = {v["id"]: v for v in gt["videos"]}
    vid_ids = sorted(videos)
    cat_ids = sorted(c["id"] for c in gt["categories"])

    gts, dts = defaultdict(list), defaultdict(list)
    for ann in gt["annotations"]:
        v = videos[ann["video_id"]]
        segs = [_ref_to_rle(s, v["height"], v["width"]) if s else s for s in ann["segmentations"]]
        gts[ann["video_id"], ann["category_id"]].append(
            {"id": ann["id"], "segs": segs, "avg": _ref_avg(ann["areas"]), "crowd": ann["iscrowd"]})
    for n, r in enumerate(results):
        areas = [mask_utils.area(s) if s else None for s in r["segmentations"]]
        dts[r["video_id"], r["category_id"]].append(
            {"id": n + 1, "segs": r["segmentations"], "avg": _ref_avg(areas), "score": r["score"]})

    evals = {}
    for c in cat_ids:
        for v in vid_ids:
            g_all, d_all = gts[v, c], dts[v, c]
            if not g_all and not d_all:
                continue
            order = np.argsort([-d["score"] for d in d_all], kind="mergesort")[:100]
            d_all = [d_all[i] for i in order]
            for a, (lo, hi) in enumerate(area_rngs):
                ign = [1 if g["crowd"] or g["avg"] < lo or g["avg"] > hi else 0 for g in g_all]
                gorder = np.argsort(ign, kind="mergesort")
                g = [g_all[i] for i in gorder]
                g_ign = [ign[i] for i in gorder]
                ious = [[_ref_tube_iou(d["segs"], gg["segs"]) for gg in g] for d in d_all]
                dtm = np.zeros((10, len(d_all)))
                dt_ig = np.zeros((10, len(d_all)))
                gtm = np.zeros((10, len(g)))
                for t, thr in enumerate(thrs):
                    for di, d in enumerate(d_all):
                        best, m = min(thr, 1 - 1e-10), -1
                        for gi in range(len(g)):
                            if gtm[t, gi] > 0 and not g[gi]["crowd"]:
                                continue
                            if m > -1 and g_ign[m] == 0 and g_ign[gi] == 1:
                                break
                            if ious[di][gi] < best:
                                continue
                            best, m = ious[di][gi], gi
                        if m == -1:
                            continue
                        dt_ig[t, di] = g_ign[m]
                        dtm[t, di] = g[m]["id"]
                        gtm[t, m] = d["id"]
                    for di, d in enumerate(d_all):
                        if dtm[t, di] == 0 and (d["avg"] < lo or d["avg"] > hi):
                            dt_ig[t, di] = 1
                evals[c, a, v] = ([d["score"] for d in d_all], dtm, dt_ig, g_ign)

    precision = -np.ones((10, 101, len(cat_ids), 4, 3))
    recall = -np.ones((10, len(cat_ids), 4, 3))
    for k, c in enumerate(cat_ids):
        for a in range(4):
            for mi, md in enumerate(max_dets):
                es = [evals[c, a, v] for v in vid_ids if (c, a, v) in evals]
                if not es:
                    continue
                scores = np.concatenate([e[0][:md] for e in es])
                order = np.argsort(-scores, kind="mergesort")
                dtm = np.concatenate([e[1][:, :md] for e in es], axis=1)[:, order]
                dt_ig = np.concatenate([e[2][:, :md] for e in es], axis=1)[:, order]
                npig = sum(1 for e in es for x in e[3] if x == 0)
                if npig == 0:
                    continue
                for t in range(10):
                    tp = fp = 0
                    rc, pr = [], []
                    for j in range(dtm.shape[1]):
                        if dt_ig[t, j]:
                            tp_j, fp_j = 0, 0
                        else:
                            tp_j, fp_j = int(dtm[t, j] != 0), int(dtm[t, j] == 0)
                        tp, fp = tp + tp_j, fp + fp_j
                        rc.append(tp / npig)
                        pr.append(tp / (tp + fp + np.spacing(1)))
                    recall[t, k, a, mi] = rc[-1] if rc else 0
                    for j in range(len(pr) - 1, 0, -1):
                        pr[j - 1] = max(pr[j - 1], pr[j])
                    for r, rt in enumerate(rec_thrs):
                        j = next((j for j, x in enumerate(rc) if x >= rt), None)
                        precision[t, r, k, a, mi] = pr[j] if j is not None else 0.0

    def mean_valid(s):
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    out = {"AP": mean_valid(precision[:, :, :, 0, 2]), "AP50": mean_valid(precision[0, :, :, 0, 2]),
           "AP75": mean_valid(precision[5, :, :, 0, 2]), "APs": mean_valid(precision[:, :, :, 1, 2]),
           "APm": mean_valid(precision[:, :, :, 2, 2]), "APl": mean_valid(precision[:, :, :, 3, 2]),
           "AR1": mean_valid(recall[:, :, 0, 0]), "AR10": mean_valid(recall[:, :, 0, 1])}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    out["per_category"] = {names[c]: mean_valid(precision[:, :, k, 0, 2]) for k, c in enumerate(cat_ids)}
    return out


def _uncompressed_rle(m: np.ndarray) -> dict:
    flat = m.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs  # counts start with a run of zeros
    return {"size": list(m.shape), "counts": runs}


def random_case(seed: int) -> tuple[dict, list[dict]]:
    """Boxes jittered across frames in 300x400 frames (areas span small, medium and large), nulls,
    crowds, duplicate gts (IoU ties), tied scores, empty (not null) predicted masks where the gt is
    absent, and all three GT segmentation formats."""
    rng = np.random.default_rng(seed)
    h, w = 300, 400
    d = Data(categories=3)
    for _ in range(8):
        length = int(rng.integers(2, 5))
        vid = d.video(length, h, w)
        for _ in range(int(rng.integers(1, 6))):
            cat = int(rng.integers(1, 4))
            bw, bh = int(rng.integers(20, 350)), int(rng.integers(20, 250))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            boxes = [None if rng.random() < 0.25 else
                     (x + int(rng.integers(0, 10)), y, min(w, x + bw + int(rng.integers(0, 10))), y + bh)
                     for _ in range(length)]
            copies = 2 if rng.random() < 0.15 else 1
            for _ in range(copies):
                d.gt_tube(vid, cat, boxes, iscrowd=int(rng.random() < 0.2))
                ann = d.gt["annotations"][-1]
                # the field, not the mask, decides the area range: scale it to tell them apart
                scale = float(rng.choice([0.5, 1.0, 3.0]))
                ann["areas"] = [None if a is None or rng.random() < 0.1 else a * scale for a in ann["areas"]]
                for t, b in enumerate(boxes):
                    fmt = rng.random()
                    if b is not None and fmt < 0.3:
                        ann["segmentations"][t] = [[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]]]
                    elif b is not None and fmt < 0.5:
                        ann["segmentations"][t] = _uncompressed_rle(tube([b], h, w)[0])
            for _ in range(int(rng.integers(0, 4))):
                dx, dy = rng.integers(-15, 15, size=2)
                det_boxes = [None if b is None and rng.random() < 0.7 or rng.random() < 0.15 else
                             (0, 0, 0, 0) if b is None or rng.random() < 0.05 else
                             (max(0, b[0] + dx), max(0, b[1] + dy), min(w, b[2] + dx), min(h, b[3] + dy))
                             for b in boxes]
                det_cat = cat if rng.random() < 0.8 else int(rng.integers(1, 4))
                d.det(vid, det_cat, det_boxes, score=round(float(rng.random()), 1))
    return d.gt, d.results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_implementation(seed: int) -> None:
    gt, results = random_case(seed)
    got = evaluate(gt, results)
    want = reference_eval(gt, results)
    assert 0.0 < want["AP"] < 1.0  # a non-trivial case
    for key in SUMMARY_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["per_category"].keys() == want["per_category"].keys()
    for name, ap in want["per_category"].items():
        assert got["per_category"][name] == pytest.approx(ap, abs=1e-12), name
