import numpy as np
import pytest
import torch

from svis_ray.config import PseudoConfig
from svis_ray.pseudo import anchor_queries, grabcut, pseudo_label_clip, select_frame, strong_augment

K = 3  # classes


def logits_for(probs):
    """Logits whose softmax is ``probs`` ([Q, K+1])."""
    return torch.tensor(probs, dtype=torch.float32).log()


def square(h, w, y0, x0, s):
    m = torch.zeros(h, w)
    m[y0:y0 + s, x0:x0 + s] = 1
    return m


def iou(a, b):
    a, b = np.asarray(a, bool), b.bool().numpy()
    return (a & b).sum() / (a | b).sum()


def test_select_frame_threshold_topk_and_area():
    cfg = PseudoConfig(topk=2, score_threshold=0.8, min_area=4, anchor=False)
    probs = [[0.9, 0.05, 0.0, 0.05],   # q0: class 0 at 0.9 -> kept
             [0.05, 0.85, 0.0, 0.1],   # q1: class 1 at 0.85 -> kept (top-2)
             [0.0, 0.0, 0.82, 0.18],   # q2: 0.82 > thr but outside the top-2
             [0.1, 0.1, 0.1, 0.7]]
    masks = torch.stack([square(8, 8, 0, 0, 3), square(8, 8, 4, 4, 1), square(8, 8, 0, 0, 4),
                         square(8, 8, 0, 0, 4)]) * 2 - 1  # logits: +1 inside, -1 outside
    fp = select_frame(logits_for(probs), masks, cfg)
    # q1's mask has 1 pixel < min_area: dropped even though its score passes
    assert fp.labels.tolist() == [0]
    assert np.allclose(fp.scores, [0.9])
    assert fp.masks.shape == (1, 8, 8) and fp.masks.sum() == 9
    assert fp.candidates == 2 and not fp.anchored.any()


def test_anchored_query_passes_lower_threshold_with_gt_class():
    cfg = PseudoConfig(topk=10, score_threshold=0.8, anchor_score_threshold=0.3, min_area=1)
    probs = [[0.3, 0.2, 0.1, 0.4],    # unsure teacher: foreground 0.6, best class 0.3
             [0.05, 0.05, 0.05, 0.85]]
    masks = torch.stack([square(8, 8, 0, 0, 4), square(8, 8, 4, 4, 2)]) * 2 - 1
    plain = select_frame(logits_for(probs), masks, cfg)
    assert len(plain.labels) == 0
    anchored = select_frame(logits_for(probs), masks, cfg, anchors={0: 2})
    assert anchored.labels.tolist() == [2]  # the ground-truth class, not the teacher's argmax
    assert anchored.anchored.tolist() == [True]
    assert np.isclose(anchored.scores[0], 0.6)


def test_nms_keeps_one_pseudo_label_per_object_anchored_first():
    probs = [[0.05, 0.05, 0.5, 0.4],   # q0: anchored (gt class 2), foreground 0.6
             [0.95, 0.0, 0.0, 0.05],   # q1: confident duplicate of q0's object (IoU 12/20)
             [0.0, 0.91, 0.0, 0.09],   # q2: another object; q3: its weaker duplicate, other class
             [0.9, 0.0, 0.0, 0.1]]
    masks = torch.stack([square(10, 10, 0, 0, 4), square(10, 10, 0, 1, 4),
                         square(10, 10, 5, 5, 5), square(10, 10, 5, 5, 4)]) * 2 - 1
    cfg = PseudoConfig(score_threshold=0.8, min_area=1, nms_iou=0.5)
    fp = select_frame(logits_for(probs), masks, cfg, anchors={0: 2})
    assert fp.labels.tolist() == [2, 1] and fp.anchored.tolist() == [True, False]
    off = select_frame(logits_for(probs), masks, PseudoConfig(score_threshold=0.8, min_area=1, nms_iou=1.0),
                       anchors={0: 2})
    assert off.labels.tolist() == [2, 0, 1, 0]  # Sparse-MinVIS: no NMS
    # At 0.62, q1 (IoU 0.6 with q0) stays and q3 (IoU 16/25 = 0.64 with q2) goes.
    assert select_frame(logits_for(probs), masks, PseudoConfig(score_threshold=0.8, min_area=1, nms_iou=0.62),
                        anchors={0: 2}).labels.tolist() == [2, 0, 1]


def test_anchor_queries_hungarian_iou():
    pred = torch.stack([square(10, 10, 0, 0, 4), square(10, 10, 5, 5, 5), square(10, 10, 0, 6, 2)]).bool()
    gt = torch.stack([square(10, 10, 5, 5, 4), square(10, 10, 0, 0, 4)]).bool()
    got = anchor_queries(pred, gt, torch.tensor([1, 2]), min_iou=0.5)
    assert got == {0: 2, 1: 1}  # q1 vs gt0: IoU 16/25 = 0.64
    assert anchor_queries(pred, gt, torch.tensor([1, 2]), min_iou=0.7) == {0: 2}


def test_pseudo_label_clip_follows_tracks_across_permuted_queries():
    """Frame 0 is labelled; in frame 1 the teacher's query order is permuted. The anchored
    track must still be found (via embeddings) and take the ground-truth class."""
    torch.manual_seed(0)
    q, c = 4, 8
    emb = torch.randn(q, c)
    perm = torch.tensor([2, 0, 3, 1])  # frame-1 query i holds object perm[i]
    obj_masks = torch.stack([square(32, 32, 0, 0, 8), square(32, 32, 16, 16, 8), square(32, 32, 0, 20, 8),
                             square(32, 32, 20, 0, 8)])
    low = torch.nn.functional.interpolate((obj_masks * 20 - 10)[None], scale_factor=0.25, mode="bilinear")[0]
    probs0 = torch.tensor([[0.2, 0.2, 0.2, 0.4]] * q)  # unsure: nothing passes 0.8 on its own
    probs0[3] = torch.tensor([0.9, 0.04, 0.03, 0.03])   # object 3: confident class 0
    outputs = {
        "pred_logits": torch.stack([probs0.log(), probs0[perm].log()]),
        "pred_masks": torch.stack([low, low[perm]]),
        "pred_embds": torch.stack([emb, emb[perm]]),
    }
    cfg = PseudoConfig(min_area=1, anchor_iou=0.5, anchor_score_threshold=0.5)
    gt_masks = obj_masks[1:2].numpy().astype(np.uint8)  # GT: object 1, class 2
    res = pseudo_label_clip(outputs, (32, 32), np.array([True, False]), gt_masks, np.array([0]),
                            np.array([2]), cfg)
    assert res[0] is None
    fp = res[1]
    by_label = dict(zip(fp.labels.tolist(), fp.masks))
    assert set(by_label) == {2, 0}
    assert iou(by_label[2], obj_masks[1]) > 0.9  # anchored object 1, with the GT class
    assert iou(by_label[0], obj_masks[3]) > 0.9  # confident object 3
    assert fp.anchored.tolist() == [True, False]
    cfg_off = PseudoConfig(min_area=1, anchor=False)
    res_off = pseudo_label_clip(outputs, (32, 32), np.array([True, False]), gt_masks, np.array([0]),
                                np.array([2]), cfg_off)
    assert res_off[1].labels.tolist() == [0]


def test_strong_augment_changes_only_teacher_labelled_frames_inside_their_size():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 96), dtype=torch.uint8)
    images[:, :, 48:] = 0  # padding below frames of 48 x 96
    original = images.clone()
    targets = [{"pseudo": False, "labels": torch.zeros(1), "size": (48, 96)},  # ground truth
               {"pseudo": True, "labels": torch.zeros(2), "size": (48, 96)},  # teacher-labelled
               {"pseudo": True, "labels": None, "size": (48, 96)},  # online: the student labels it
               {"pseudo": True, "labels": torch.zeros(0), "size": (48, 96)}]  # teacher kept nothing
    changed = []
    for _ in range(5):  # each frame draws its own augmentation; some draws leave a frame as it was
        out = strong_augment(images, targets)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert torch.equal(out[[0, 2]], images[[0, 2]])
        assert torch.equal(out[:, :, 48:], images[:, :, 48:])
        changed.append([not torch.equal(out[i], images[i]) for i in (1, 3)])
    assert all(any(c[j] for c in changed) for j in (0, 1))
    assert torch.equal(images, original)  # the input is not augmented in place


def ring_scene(seed=0):
    """A magenta ring (outer radius 20, inner 11) on a noisy grey-green background, 96x128, and
    the blob a 1/4-resolution model would predict for it: the filled disc, 2 pixels too wide."""
    rng = np.random.default_rng(seed)
    image = (rng.normal(0, 12, (96, 128, 3)) + [90, 120, 90]).clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:96, :128]
    r = np.hypot(yy - 48, xx - 60)
    ring = (r <= 20) & (r >= 11)
    image[ring] = [200, 40, 190]
    blob = r <= 22
    return image, ring, blob


def test_grabcut_snaps_a_blurred_mask_to_the_object():
    image, ring, blob = ring_scene()
    assert iou(blob, torch.from_numpy(ring)) < 0.7
    refined = grabcut(image, blob, min_area=16)
    assert refined.dtype == bool and refined.shape == ring.shape
    assert iou(refined, torch.from_numpy(ring)) > 0.9  # the hole and the overhang are gone


def test_grabcut_keeps_the_teachers_mask_when_it_cannot_help():
    image, _, blob = ring_scene()
    tiny = np.zeros_like(blob)
    tiny[10:13, 10:13] = True  # 9 pixels: too few to fit a colour model on
    assert grabcut(image, tiny, min_area=16) is tiny
    flat = np.full_like(image, 128)  # one colour: no edge to snap to
    assert np.array_equal(grabcut(flat, blob, min_area=16), blob)
    everything = np.ones_like(blob)  # no background to learn from: OpenCV refuses, the mask stays
    assert grabcut(image, everything, min_area=16) is everything
    with pytest.raises(ValueError, match="differ in size"):
        grabcut(image[:48], blob, min_area=16)


def test_select_frame_refines_kept_masks_with_the_image():
    image, ring, blob = ring_scene()
    masks = torch.from_numpy(np.where(blob, 5.0, -5.0)).float()[None]  # [1,H,W] logits
    logits = logits_for([[0.95, 0.02, 0.02, 0.01]])
    plain = select_frame(logits, masks, PseudoConfig(score_threshold=0.8, anchor=False))
    refined = select_frame(logits, masks, PseudoConfig(score_threshold=0.8, anchor=False, refine="grabcut"),
                           image=image)
    assert np.array_equal(plain.masks[0], blob)
    assert refined.labels.tolist() == plain.labels.tolist() == [0]
    assert iou(refined.masks[0], torch.from_numpy(ring)) > 0.9
    with pytest.raises(ValueError, match="needs the frame's image"):
        select_frame(logits, masks, PseudoConfig(score_threshold=0.8, anchor=False, refine="grabcut"))
