"""pseudo.reliability: the teacher's labels of a clip count as much as it gets the labelled frame right."""
import numpy as np
import pytest
import torch

from svis_ray.config import PseudoConfig, load_config
from svis_ray.errors import SvisError
from svis_ray.pseudo import clip_reliability, frame_reliability, reliability_weight

K = 3  # classes


def frame(preds, h=16, w=16):
    """Logits [Q,K+1] and mask logits [Q,h,w] for ``preds``: (class or None, (y0, y1, x0, x1), score)."""
    logits = torch.full((len(preds), K + 1), -10.0)
    masks = torch.full((len(preds), h, w), -5.0)
    for q, (c, (y0, y1, x0, x1), score) in enumerate(preds):
        if c is None:
            logits[q, -1] = 10.0
        else:  # softmax score ~= score on class c, the rest on no-object
            logits[q, c], logits[q, -1] = np.log(score), np.log(1 - score)
        masks[q, y0:y1, x0:x1] = 5.0
    return logits, masks


def gt(*boxes, h=16, w=16):
    m = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        m[i, y0:y1, x0:x1] = True
    return m


CFG = PseudoConfig(score_threshold=0.8, min_area=4)


def test_right_wrong_missed_and_extra_predictions():
    a, b = (0, 8, 0, 8), (8, 16, 8, 16)
    gm, gl = gt(a, b), np.array([0, 1])
    assert frame_reliability(*frame([(0, a, 0.95), (1, b, 0.95)]), gm, gl, CFG) == pytest.approx(1.0)
    assert frame_reliability(*frame([(0, a, 0.95), (2, b, 0.95)]), gm, gl, CFG) == pytest.approx(0.5)  # wrong class
    assert frame_reliability(*frame([(0, a, 0.95), (1, b, 0.5)]), gm, gl, CFG) == pytest.approx(0.5)  # not confident: missed
    extra = frame([(0, a, 0.95), (1, b, 0.95), (2, (0, 8, 8, 16), 0.95)])  # a false positive
    assert frame_reliability(*extra, gm, gl, CFG) == pytest.approx(2 / 3)
    half = frame([(0, (0, 8, 0, 4), 0.95), (1, b, 0.95)])  # a mask covering half of its object
    assert frame_reliability(*half, gm, gl, CFG) == pytest.approx((0.5 + 1) / 2)
    empty = gt()
    assert frame_reliability(*frame([(None, a, 0.9)]), empty, np.zeros(0, int), CFG) == 1.0  # nothing, rightly
    assert frame_reliability(*frame([(0, a, 0.95)]), empty, np.zeros(0, int), CFG) == 0.0
    assert frame_reliability(*frame([(None, a, 0.9)]), gm, gl, CFG) == 0.0


def test_clip_reliability_reads_the_labelled_frames_at_model_resolution():
    a = (0, 8, 0, 8)
    logits, masks = frame([(0, a, 0.95), (1, (8, 16, 8, 16), 0.95)])
    small = torch.nn.functional.interpolate(masks[None], scale_factor=0.25, mode="nearest")[0]
    outputs = {"pred_logits": torch.stack([logits, logits]), "pred_masks": torch.stack([small, small])}
    gm = gt(a).numpy().astype(np.uint8)
    labelled = np.array([False, True])
    # frame 1 is labelled with one object; the teacher also claims a second one there
    r = clip_reliability(outputs, (16, 16), labelled, gm, np.array([1]), np.array([0]), CFG)
    assert 0.4 < r < 0.55
    assert clip_reliability(outputs, (16, 16), np.array([False, False]), gm[:0], np.zeros(0, int),
                            np.zeros(0, int), CFG) == 1.0


def test_weights_per_mode_and_config_checks():
    assert reliability_weight(0.3, PseudoConfig()) == 1.0  # off
    assert reliability_weight(0.3, PseudoConfig(reliability="drop", reliability_min=0.5)) == 0.0
    assert reliability_weight(0.6, PseudoConfig(reliability="drop", reliability_min=0.5)) == 1.0
    assert reliability_weight(0.3, PseudoConfig(reliability="weight")) == pytest.approx(0.3)
    cfg = load_config(None, ["pseudo.reliability=drop", "pseudo.reliability_min=0.4"])
    assert (cfg.pseudo.reliability, cfg.pseudo.reliability_min) == ("drop", 0.4)
    with pytest.raises(SvisError, match="pseudo.reliability_min"):
        load_config(None, ["pseudo.reliability_min=1.5"])
    with pytest.raises(SvisError, match="pseudo.reliability"):
        load_config(None, ["pseudo.reliability=soft"])


def test_collate_carries_the_clip_weight_to_its_pseudo_labelled_frames():
    from svis_ray.data.collate import ClipCollate

    img = np.zeros((1, 2, 8, 8, 3), np.uint8)
    obj = lambda *arrays: np.array(list(arrays) + [None], dtype=object)[:-1]  # noqa: E731  ragged columns
    batch = {"clip_index": np.array([0]), "image": obj(img[0]), "labelled": obj(np.array([True, False])),
             "gt_frame": obj(np.array([0])), "gt_labels": obj(np.array([1])), "gt_masks": obj(np.ones((1, 8, 8), np.uint8)),
             "ps_frame": obj(np.array([1])), "ps_labels": obj(np.array([2])), "ps_masks": obj(np.ones((1, 8, 8), np.uint8)),
             "ps_scores": obj(np.array([0.9], np.float32)), "ps_anchored": obj(np.array([True])),
             "ps_candidates": np.array([3]), "ps_weight": np.array([0.25], np.float32),
             "teacher_version": np.array([1]), "teacher_time": np.array([0.0]), "bad_frames": np.array([0]),
             "video_id": np.array([7]), "frame_idx": obj(np.array([0, 1]))}
    _, targets, _ = ClipCollate()(batch)
    assert "reliability" not in targets[0] and targets[1]["reliability"] == 0.25
