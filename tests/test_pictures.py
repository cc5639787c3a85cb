"""The pictures (no Ray): label placement, colours, ground-truth rows, the pseudo-label gallery."""
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from svis_ray.pictures import (VERDICT_COLOURS, PseudoLabelGallery, colour, draw_masks, match_tracks, place_labels,
                               render_eval_picture)


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def square(h, w, y, x, side):
    m = np.zeros((h, w), bool)
    m[y:y + side, x:x + side] = True
    return m


def overlap(a, b):
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def test_labels_never_overlap_and_small_masks_are_labelled_outside():
    h, w = 192, 256
    # three small objects side by side (the case whose labels used to pile up) and a large one
    masks = [square(h, w, 60, 40 + 14 * i, 10) for i in range(3)] + [square(h, w, 100, 120, 80)]
    places = place_labels(masks, [(70, 14)] * 4, taken=[(0, 0, 90, 14)])  # a caption in the corner
    boxes = [b for b, _ in places]
    assert all(overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(overlap(b, (0, 0, 90, 14)) == 0 for b in boxes)
    assert all(0 <= b[0] and b[2] <= w and 0 <= b[1] and b[3] <= h for b in boxes)
    assert [on_mask for _, on_mask in places] == [False, False, False, True]
    for (x0, y0, x1, y1), _ in places[:3]:
        assert not any(m[y0:y1, x0:x1].any() for m in masks[:3])  # off the small objects


def test_fill_is_translucent_and_contour_solid():
    img = np.full((64, 64, 3), 100, np.uint8)
    m = square(64, 64, 16, 16, 32)
    out = draw_masks(img, [(m, (255, 0, 0), "")])
    assert tuple(out[32, 32]) != (255, 0, 0) and out[32, 32, 0] > 100  # tinted, not painted over
    assert tuple(out[16, 32]) == (255, 0, 0)  # the contour is the track's colour


def test_predictions_matched_to_ground_truth_share_its_colour_in_the_picture(demo_root):
    from svis_ray.data.ytvis import YTVIS
    from svis_ray.pictures import gt_tracks

    val = YTVIS.load(demo_root / "val.json")
    video = val.videos[0]
    gt = gt_tracks(val, video["id"])
    # predictions: the ground truth in reverse order, so track k is object len-1-k
    records = [{"video_id": video["id"], "category_id": val.idx_to_cat[val.class_names.index(g["class"])],
                "score": 0.9 - 0.1 * k, "segmentations": g["segmentations"]} for k, g in enumerate(gt[::-1])]
    assert match_tracks([r["segmentations"] for r in records], [g["segmentations"] for g in gt]) == {
        k: len(gt) - 1 - k for k in range(len(gt))}
    img = render_eval_picture(val, str(demo_root), records, videos=1, max_frames=3, scale=2)
    h = 2 * video["height"]
    assert img.shape == (2 * h + 2, 3 * 2 * video["width"], 3)  # ground-truth row above the prediction row
    for row in (img[:h], img[h + 2:]):  # every object's colour appears in both rows
        for j in range(len(gt)):
            assert (row == np.array(colour(j), np.uint8)).all(-1).any()


def test_pseudo_label_gallery_marks_each_verdict(tmp_path):
    import cv2

    class Pseudo:
        masks = np.stack([square(48, 64, 5, 5, 12), square(48, 64, 30, 40, 8)])
        labels, scores, anchored = np.array([0, 1]), np.array([0.9, 0.4]), np.array([True, False])

    gallery = PseudoLabelGallery(tmp_path, ["disk", "ring"], frames=2)
    for t in range(3):
        gallery(7, t, np.full((48, 64, 3), 90, np.uint8), Pseudo.masks[:1], np.array([0]), Pseudo,
                np.array(["correct", "background"], object))
    gallery.flush()
    assert [p.name for p in gallery.written] == ["video_7.png"]
    img = cv2.cvtColor(cv2.imread(str(tmp_path / "video_7.png")), cv2.COLOR_BGR2RGB)
    assert img.shape[1] == 2 * 2 * 64  # two of the three frames, at scale 2
    for kind in ("correct", "background"):
        assert (img == np.array(VERDICT_COLOURS[kind], np.uint8)).all(-1).sum() > 20


@pytest.mark.parametrize("spread", [0.0, 0.04])
def test_accuracy_chart_shows_the_spread_over_seeds(tmp_path, spread):
    import cv2

    from svis_ray.benchmark import KEYS, bar_chart, summarize

    results = summarize({"full": {"seeds": {str(i): {k: 0.2 + spread * (i - 1) for k in KEYS} for i in range(3)}}})
    bar_chart(results, tmp_path / "accuracy.png")
    img = cv2.imread(str(tmp_path / "accuracy.png"))
    bar = np.nonzero((img[:, 70 + 50] < 40).all(-1))[0]  # the error bar (black) of the first recipe
    dots = ((img[:, 70:70 + 30] == (0, 80, 200)).all(-1)).any(1).nonzero()[0]  # its seeds (orange, BGR)
    bar_len, dots_len = bar.max() - bar.min() - 1, dots.max() - dots.min() - 6  # caps 2 px, dots 7 px tall
    if spread == 0:
        assert bar_len <= 1 and dots_len <= 1
    else:  # +- 1 std against seeds 2 x spread apart: std / spread = sqrt(2/3)
        assert bar_len / dots_len == pytest.approx((2 / 3) ** 0.5, rel=0.1)
