import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from svis_ray.losses import SetCriterion
from svis_ray.matcher import HungarianMatcher, point_sample

K, Q, H, W = 5, 6, 32, 48  # classes, queries, padded image size (pred masks are H/4 x W/4)


def box_mask(y0: int, x0: int, y1: int, x1: int) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def frame_targets(boxes, labels, weight=None) -> dict:
    masks = torch.stack([box_mask(*b) for b in boxes]) if boxes else torch.zeros(0, H, W, dtype=torch.bool)
    target = {"labels": torch.tensor(labels, dtype=torch.int64), "masks": masks}
    if weight is not None:
        target["weight"] = weight
    return target


def random_outputs(batch: int, num_aux: int = 0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def layer():
        return {"pred_logits": torch.randn(batch, Q, K + 1, generator=g).requires_grad_(),
                "pred_masks": (3 * torch.randn(batch, Q, H // 4, W // 4, generator=g)).requires_grad_()}

    outputs = layer()
    outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
    return outputs


BOXES = [(0, 0, 16, 16), (16, 24, 32, 48), (4, 28, 12, 44)]  # multiples of 4: exact at 1/4 res
LABELS = [1, 3, 0]


def test_point_sample_reads_pixel_centres():
    grid = torch.arange(12.0).reshape(1, 1, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([(xs + 0.5) / 4, (ys + 0.5) / 3], -1).reshape(1, -1, 2)
    torch.testing.assert_close(point_sample(grid, coords), grid.reshape(1, 1, -1))


def test_matcher_recovers_planted_assignment():
    perm = [4, 0, 2]  # target j is predicted by query perm[j]
    logits = torch.full((1, Q, K + 1), -5.0)
    logits[0, :, K] = 5.0
    masks = torch.full((1, Q, H // 4, W // 4), -8.0)
    for j, (label, (y0, x0, y1, x1)) in enumerate(zip(LABELS, BOXES)):
        logits[0, perm[j], label] = 5.0
        logits[0, perm[j], K] = -5.0
        masks[0, perm[j], y0 // 4:y1 // 4, x0 // 4:x1 // 4] = 8.0
    targets = [frame_targets(BOXES, LABELS), frame_targets([], [])]
    outputs = {"pred_logits": logits.repeat(2, 1, 1), "pred_masks": masks.repeat(2, 1, 1, 1)}

    (pred_idx, tgt_idx), (empty_pred, empty_tgt) = HungarianMatcher(num_points=500)(outputs, targets)

    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 4, 1: 0, 2: 2}
    assert pred_idx.dtype == tgt_idx.dtype == torch.int64
    assert empty_pred.numel() == empty_tgt.numel() == 0


def reference_losses(outputs, targets, num_points, eos_coef=0.1):
    """Unweighted Mask2Former losses, written out directly (same RNG order as the criterion)."""
    indices = HungarianMatcher(num_points=num_points)(outputs, targets)
    logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
    target_classes = torch.full((len(targets), Q), K)
    for b, (p, t) in enumerate(indices):
        target_classes[b, p] = targets[b]["labels"][t]
    class_weight = torch.ones(K + 1)
    class_weight[K] = eos_coef
    loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight)

    src = torch.cat([pred_masks[b, p] for b, (p, _) in enumerate(indices)])[:, None]
    tgt = torch.cat([targets[b]["masks"][t] for b, (_, t) in enumerate(indices)]).float()[:, None]
    m = len(src)
    sample = lambda x, c: F.grid_sample(x, 2 * c[:, :, None] - 1, align_corners=False)[:, 0, :, 0]
    candidates = torch.rand(m, 3 * num_points, 2)
    most_uncertain = (-sample(src, candidates).abs()).topk(int(0.75 * num_points)).indices
    coords = torch.cat([candidates[torch.arange(m)[:, None], most_uncertain],
                        torch.rand(m, num_points - int(0.75 * num_points), 2)], 1)
    x, y = sample(src, coords), sample(tgt, coords)
    num_masks = sum(len(t["labels"]) for t in targets)
    loss_mask = F.binary_cross_entropy_with_logits(x, y, reduction="none").mean(1).sum() / num_masks
    p = x.sigmoid()
    loss_dice = (1 - (2 * (p * y).sum(1) + 1) / (p.sum(1) + y.sum(1) + 1)).sum() / num_masks
    return {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}


def test_unit_weights_equal_standard_mask2former_losses():
    outputs = random_outputs(batch=3)
    targets = [frame_targets(BOXES, LABELS), frame_targets(BOXES[:1], [2], weight=1.0),
               frame_targets([], [])]
    criterion = SetCriterion(K, HungarianMatcher(num_points=400), num_points=400)

    torch.manual_seed(0)
    losses = criterion(outputs, targets)
    torch.manual_seed(0)
    expected = reference_losses(outputs, targets, num_points=400)

    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice"}
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name])


def test_frame_weights_scale_each_frames_terms_linearly():
    outputs = random_outputs(batch=2)
    criterion = SetCriterion(K, HungarianMatcher(num_points=300), num_points=300)

    def run(w0, w1):
        torch.manual_seed(0)  # same matching and sampled points in every run
        return criterion(outputs, [frame_targets(BOXES, LABELS, w0), frame_targets(BOXES[1:], [3, 0], w1)])

    both, first, second = run(1.0, 0.3), run(1.0, 0.0), run(0.0, 1.0)
    for name in both:
        assert second[name] > 0
        torch.testing.assert_close(both[name], first[name] + 0.3 * second[name])

    # A weight-0 frame gets no gradient at all.
    criterion.total(first).backward()
    assert outputs["pred_logits"].grad[1].abs().max() == 0
    assert outputs["pred_masks"].grad[1].abs().max() == 0
    assert outputs["pred_logits"].grad[0].abs().max() > 0


def test_empty_frames_give_finite_losses_and_classification_gradient():
    outputs = random_outputs(batch=2, num_aux=1)
    criterion = SetCriterion(K, HungarianMatcher(num_points=200), num_points=200)
    losses = criterion(outputs, [frame_targets([], []), frame_targets([], [], weight=0.5)])

    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == losses["loss_dice"] == losses["loss_mask_0"] == 0
    # Every query should predict no-object: CE is the eos-weighted mean of -log p(no-object).
    logp = outputs["pred_logits"].log_softmax(-1)[..., K]
    torch.testing.assert_close(losses["loss_ce"], -(logp[0].sum() + 0.5 * logp[1].sum()) / (2 * Q))
    criterion.total(losses).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_masks"].grad is not None and outputs["pred_masks"].grad.abs().max() == 0


def test_background_weight_scales_only_unmatched_queries():
    outputs = random_outputs(batch=1)
    criterion = SetCriterion(K, HungarianMatcher(num_points=200), num_points=200)

    def run(bg):
        torch.manual_seed(0)
        target = frame_targets(BOXES, LABELS)
        target["bg_weight"] = bg
        return criterion(outputs, [target])

    full, half, none = run(1.0), run(0.5), run(0.0)
    for name in ("loss_mask", "loss_dice"):  # mask terms belong to matched queries only
        torch.testing.assert_close(none[name], full[name])
    # CE = (matched + bg * unmatched) / fixed normaliser: linear in bg, and bg=0 keeps the matched part.
    torch.testing.assert_close(half["loss_ce"], (full["loss_ce"] + none["loss_ce"]) / 2)
    assert 0 < none["loss_ce"] < full["loss_ce"]
    # With bg=0 the 3 unmatched queries get no gradient; the 3 matched ones do.
    criterion.total(none).backward()
    moved = outputs["pred_logits"].grad[0].abs().sum(-1) > 0
    assert moved.sum() == len(LABELS)


def test_mixed_batch_with_empty_frame():
    outputs = random_outputs(batch=2)
    criterion = SetCriterion(K, HungarianMatcher(num_points=200), num_points=200)
    losses = criterion(outputs, [frame_targets([], []), frame_targets(BOXES, LABELS)])
    criterion.total(losses).backward()

    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert outputs["pred_logits"].grad[0].abs().sum() > 0  # empty frame still trains no-object
    assert outputs["pred_masks"].grad[0].abs().max() == 0
    assert outputs["pred_masks"].grad[1].abs().sum() > 0


def test_aux_losses_and_weighted_total():
    outputs = random_outputs(batch=2, num_aux=2)
    criterion = SetCriterion(K, HungarianMatcher(num_points=200), num_points=200)
    losses = criterion(outputs, [frame_targets(BOXES, LABELS), frame_targets(BOXES[:2], [4, 4])])

    names = ["loss_ce", "loss_mask", "loss_dice"]
    assert set(losses) == {f"{n}{s}" for n in names for s in ("", "_0", "_1")}
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    expected = sum(weights[n] * losses[f"{n}{s}"] for n in names for s in ("", "_0", "_1"))
    torch.testing.assert_close(criterion.total(losses), expected)


def test_num_masks_is_averaged_over_workers(tmp_path):
    outputs = random_outputs(batch=1)
    targets = [frame_targets(BOXES, LABELS)]
    criterion = SetCriterion(K, HungarianMatcher(num_points=200), num_points=200)
    torch.manual_seed(0)
    local = criterion(outputs, targets)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        distributed = criterion(outputs, targets)
    finally:
        dist.destroy_process_group()
    for name in local:
        torch.testing.assert_close(distributed[name], local[name])
    assert math.isfinite(criterion.total(distributed).item())


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_target_mask_dtypes_agree(dtype):
    outputs = random_outputs(batch=1)
    criterion = SetCriterion(K, HungarianMatcher(num_points=200), num_points=200)
    target = frame_targets(BOXES, LABELS)
    torch.manual_seed(0)
    as_bool = criterion(outputs, [target])
    torch.manual_seed(0)
    converted = criterion(outputs, [dict(target, masks=target["masks"].to(dtype))])
    for name in as_bool:
        torch.testing.assert_close(converted[name], as_bool[name])


@torch.no_grad()
def per_frame_reference(matcher: HungarianMatcher, layer: dict, targets: list[dict], coords: torch.Tensor):
    """The matcher before batching (one cost matrix and one host copy per frame), at given points.
    coords: [B, P, 2]."""
    from scipy.optimize import linear_sum_assignment

    from svis_ray.matcher import pairwise_dice, pairwise_sigmoid_ce

    out = []
    for b, target in enumerate(targets):
        if len(target["labels"]) == 0:
            out.append(([], []))
            continue
        probs = layer["pred_logits"][b].float().softmax(-1)
        pred_pts = point_sample(layer["pred_masks"][b].float()[:, None], coords[b:b + 1].expand(Q, -1, -1))[:, 0]
        tgt_masks = target["masks"].float()[:, None]
        tgt_pts = point_sample(tgt_masks, coords[b:b + 1].expand(len(tgt_masks), -1, -1))[:, 0]
        cost = (-matcher.cost_class * probs[:, target["labels"]]
                + matcher.cost_mask * pairwise_sigmoid_ce(pred_pts, tgt_pts)
                + matcher.cost_dice * pairwise_dice(pred_pts, tgt_pts))
        p, t = linear_sum_assignment(cost.numpy())
        out.append((p.tolist(), t.tolist()))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_batched_matcher_equals_per_frame_matcher(seed):
    """All frames x all decoder layers in one pass give the per-frame matcher's indices."""
    g = torch.Generator().manual_seed(seed)
    batch, num_aux, points = 5, 3, 300
    outputs = random_outputs(batch, num_aux=num_aux, seed=seed)
    targets = []
    for b in range(batch):
        n = [0, 1, 3, Q, Q + 2][b]  # an empty frame, and more targets than queries
        targets.append({"labels": torch.randint(0, K, (n,), generator=g),
                        "masks": torch.rand(n, H, W, generator=g) > 0.6})
    layers = [outputs, *outputs["aux_outputs"]]
    coords = torch.rand(len(layers), batch, points, 2, generator=g)
    matcher = HungarianMatcher(num_points=points)
    offsets = [sum(len(t["labels"]) for t in targets[:b]) for b in range(batch)]
    for layer, lc, (frame, pred, tgt) in zip(layers, coords, matcher.match(layers, targets, coords)):
        got = [(pred[frame == b].tolist(), (tgt[frame == b] - offsets[b]).tolist()) for b in range(batch)]
        assert got == per_frame_reference(matcher, layer, targets, lc)
