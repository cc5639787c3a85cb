"""The offline pseudo-label diagnostic: matching rules, and the whole pass with oracle teachers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from svis_ray.config import load_config
from svis_ray.data.ingest import resolve
from svis_ray.data.sparsify import sparsify
from svis_ray.data.transforms import pad_to_multiple, resize_image, resize_masks, resized_shape
from svis_ray.data.ytvis import YTVIS, decode_frame
from svis_ray.demo_job import DEBUG_CONFIG
from svis_ray.eval.pseudo_quality import format_quality, match_frame, pseudo_quality
from svis_ray.model import build_model, preprocess, save_checkpoint


def box(y0, x0, s, h=10, w=10):
    m = np.zeros((h, w), bool)
    m[y0:y0 + s, x0:x0 + s] = True
    return m


def test_match_frame_needs_iou_and_class_and_is_one_to_one():
    gt = np.stack([box(0, 0, 4), box(5, 5, 4)])
    pred = np.stack([box(0, 0, 4),    # exact, right class -> correct
                     box(0, 0, 4),    # duplicate of the same object -> not correct (one-to-one)
                     box(5, 5, 4),    # exact but the wrong class
                     box(6, 6, 4)])   # IoU 9/23 with gt1 -> too low
    correct, ious = match_frame(pred, np.array([1, 1, 0, 2]), gt, np.array([1, 2]))
    assert correct.tolist() == [True, False, False, False]
    assert np.allclose(ious, [1, 1, 1, 9 / 23])
    correct, _ = match_frame(pred[3:], np.array([2]), gt, np.array([1, 2]), iou=0.3)
    assert correct.tolist() == [True]
    assert match_frame(pred[:0], np.zeros(0), gt, np.array([1, 2]))[0].shape == (0,)


class Oracle(torch.nn.Module):
    """A teacher that 'predicts' the full ground truth: one query per annotated track (the
    same embedding on every frame, so the tracker follows it), class ``label + shift``."""

    def __init__(self, root, full: YTVIS, size, shift=0, queries=10):
        super().__init__()
        k = len(full.class_names)
        self.config = type("C", (), {"num_classes": k})()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.table = {}
        for v in full.videos:
            h, w = resized_shape(v["height"], v["width"], *size)
            hp, wp = pad_to_multiple(h, w)
            ids = [a["id"] for a in full.annotations(v["id"])]
            for t, name in enumerate(v["file_names"]):
                x = torch.zeros(3, hp, wp, dtype=torch.uint8)
                img = resize_image(decode_frame(resolve(str(root), "JPEGImages/" + name)), (h, w))
                x[:, :h, :w] = torch.from_numpy(img).permute(2, 0, 1)
                logits = torch.full((queries, k + 1), -10.0)
                logits[:, k] = 10.0  # no object
                masks = torch.full((queries, hp, wp), -10.0)
                for a in full.annotations_on_frame(v["id"], t):
                    q = ids.index(a["id"])
                    m = resize_masks(mask_utils.decode(a["rle"])[None], (h, w))[0]
                    masks[q, :h, :w] = torch.from_numpy(m).float() * 20 - 10
                    logits[q, k], logits[q, (a["label"] + shift) % k] = -10.0, 10.0
                key = preprocess(x[None], [(h, w)])[0]  # what the model is given
                self.table[key.numpy().tobytes()] = (logits, F.avg_pool2d(masks[None], 4)[0])

    def forward(self, x):
        out = [self.table[f.numpy().tobytes()] for f in x]
        return {"pred_logits": torch.stack([o[0] for o in out]), "pred_masks": torch.stack([o[1] for o in out]),
                "pred_embds": torch.eye(10).expand(len(x), 10, 10)}


@pytest.fixture(scope="module")
def sparse_cfg(demo_root, tmp_path_factory):
    sparsify(demo_root / "train.json", demo_root / "train_1frame.json", frames_per_video=1, strategy="middle")
    return load_config(DEBUG_CONFIG, [f"data.root={demo_root}"])


def test_oracle_teacher_is_nearly_perfect(demo_root, sparse_cfg):
    full = YTVIS.load(demo_root / "train.json")
    oracle = Oracle(demo_root, full, (96, 256))
    report = pseudo_quality(sparse_cfg, oracle, "train.json", thresholds=[0.5], max_videos=4)
    assert report["videos"] == 4 and report["frames"] == 4 * 9  # 10 frames, 1 labelled
    for s in report["variants"].values():
        assert s["precision"] >= 0.95 and s["recall"] >= 0.85, s  # misses: objects under min_area
        assert s["anchored"] > 0 and s["mean_iou"] > 0.8
    assert "score_threshold=0.9" in report["variants"] and "score_threshold=0.5" in report["variants"]
    assert "precision by distance" in format_quality(report)


def test_anchoring_corrects_the_class_and_nothing_else_does(demo_root, sparse_cfg):
    full = YTVIS.load(demo_root / "train.json")
    wrong = Oracle(demo_root, full, (96, 256), shift=1)  # every class off by one
    s = pseudo_quality(sparse_cfg, wrong, "train.json", max_videos=4)["variants"]["score_threshold=0.9"]
    assert s["anchored_precision"] >= 0.95  # anchored tracks take the labelled frame's class
    assert s["unanchored_precision"] in (0.0, None)
    assert 0 < s["precision"] < 1


def test_reliability_drops_the_clips_a_teacher_gets_wrong_on_the_labelled_frame(demo_root, sparse_cfg):
    """pseudo.reliability=drop: a teacher whose classes are all off by one fails the check on every
    labelled frame, so nothing of it is kept; the right teacher keeps (nearly) everything."""
    from dataclasses import replace

    full = YTVIS.load(demo_root / "train.json")
    cfg = replace(sparse_cfg, pseudo=replace(sparse_cfg.pseudo, reliability="drop", reliability_min=0.5))
    wrong = pseudo_quality(cfg, Oracle(demo_root, full, (96, 256), shift=1), "train.json", max_videos=2)
    s = wrong["variants"]["score_threshold=0.9"]
    assert s["kept"] == 0 and s["dropped_by_reliability"] > 0
    right = pseudo_quality(cfg, Oracle(demo_root, full, (96, 256)), "train.json", max_videos=2)
    r = right["variants"]["score_threshold=0.9"]
    assert r["dropped_by_reliability"] <= 0.1 * r["kept"] and r["kinds"]["correct"] >= 0.95 * r["kept"]
    off = pseudo_quality(sparse_cfg, Oracle(demo_root, full, (96, 256), shift=1), "train.json", max_videos=2)
    o = off["variants"]["score_threshold=0.9"]
    assert o["dropped_by_reliability"] == 0 and sum(o["kinds"].values()) == o["kept"]
    assert "wrong by kind" in format_quality(off)


def test_cli_reports_and_fails_in_one_line(demo_root, sparse_cfg, tmp_path):
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("tiny", len(YTVIS.load(demo_root / "train.json").class_names)),
                           YTVIS.load(demo_root / "train.json").class_names)
    base = [sys.executable, "-m", "svis_ray", "pseudo-quality", "--config", str(DEBUG_CONFIG),
            "--checkpoint", str(ckpt), "--videos", "2"]
    out = tmp_path / "q.json"
    r = subprocess.run(base + ["--gt", "train.json", "--thresholds", "0.5,0.95", "--out", str(out),
                               f"data.root={demo_root}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    kept = [report["variants"][f"score_threshold={v}"]["kept"] for v in ("0.5", "0.9", "0.95")]
    assert kept == sorted(kept, reverse=True)  # a higher threshold never keeps more
    # The full JSON as the "sparse" split: every frame is labelled, nothing to score.
    r = subprocess.run(base + ["--gt", "train.json", f"data.root={demo_root}", "data.train_json=train.json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "train.json: no unlabelled frames" in r.stderr
    r = subprocess.run(base + ["--gt", "val.json", f"data.root={demo_root}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "val.json: no video with id" in r.stderr
