"""Mask2Former set criterion with per-frame loss weights.

Each frame is an independent image (MinVIS trains frame-wise). Pseudo-labelled frames carry a
``weight`` (λ) that scales their classification and mask terms; the normalisers do not depend on
the weights, so weight 1 everywhere reproduces the standard unweighted Mask2Former losses.
A frame may also carry ``bg_weight``, which scales the no-object term of its *unmatched* queries:
pseudo-labels are incomplete (the teacher keeps only what it is sure of), and training every
object it missed as background teaches the student to miss it too.
"""

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from svis_ray.matcher import HungarianMatcher, point_sample

DEFAULT_WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def sample_uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float,
                            importance_sample_ratio: float) -> Tensor:
    """PointRend-style point selection, biased towards uncertain (|logit| ~ 0) locations.

    logits: [M, 1, h, w]. Returns coords [M, num_points, 2] in [0, 1]: the most uncertain of
    ``num_points * oversample_ratio`` random candidates, topped up with uniform random points so
    that confident regions are still supervised.
    """
    m = len(logits)
    candidates = torch.rand(m, int(num_points * oversample_ratio), 2, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # [M, S]
    num_uncertain = int(importance_sample_ratio * num_points)
    top = uncertainty.topk(num_uncertain, dim=1).indices  # [M, U]
    uncertain = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    uniform = torch.rand(m, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([uncertain, uniform], dim=1)


class SetCriterion(nn.Module):
    """Hungarian-matched CE + mask BCE + dice, on the final and every auxiliary decoder output."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher,
                 weight_dict: dict[str, float] | None = None, eos_coef: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(DEFAULT_WEIGHTS if weight_dict is None else weight_dict)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        # No-object is the overwhelmingly common target; down-weight it (DETR's eos_coef).
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """
        outputs: ``pred_logits`` [B, Q, K+1], ``pred_masks`` [B, Q, h, w], optional
            ``aux_outputs`` (list of dicts with the same two keys).
        targets: B dicts with ``labels`` [N], ``masks`` [N, Hpad, Wpad], optional ``weight`` (1.0)
            and ``bg_weight`` (1.0, multiplies ``weight`` for the frame's unmatched queries), as
            Python numbers (a tensor weight would cost a host sync per frame).
        Returns ``loss_ce``, ``loss_mask``, ``loss_dice`` and ``<name>_<i>`` per aux output i.

        No host synchronisation except the matcher's one copy each way: all values stay tensors.
        """
        device = outputs["pred_logits"].device
        frame_weights = torch.tensor([t.get("weight", 1.0) for t in targets], dtype=torch.float32, device=device)
        bg_weights = torch.tensor([t.get("bg_weight", 1.0) for t in targets], dtype=torch.float32, device=device)
        num_masks = self._num_masks(targets, device)
        layers = [outputs, *outputs.get("aux_outputs", [])]
        labels = torch.cat([t["labels"] for t in targets]).to(device)  # all frames' targets, concatenated
        masks = torch.cat([t["masks"] for t in targets])
        names = [""] + [f"_{i}" for i in range(len(layers) - 1)]
        losses = {}
        for suffix, layer, indices in zip(names, layers, self.matcher.match(layers, targets)):
            layer_losses = self._layer_losses(layer, labels, masks, indices, frame_weights, bg_weights, num_masks)
            losses.update({f"{name}{suffix}": value for name, value in layer_losses.items()})
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum; aux terms ``loss_ce_3`` etc. use the weight of ``loss_ce``."""
        return sum(self.weight_dict[re.sub(r"_\d+$", "", name)] * value
                   for name, value in losses.items())

    @staticmethod
    def _num_masks(targets: list[dict], device: torch.device) -> float | Tensor:
        """Target masks per worker, averaged over workers so every worker uses one normaliser
        (a device tensor under DDP: the all-reduce needs no host round trip)."""
        local = float(sum(len(t["labels"]) for t in targets))
        if dist.is_available() and dist.is_initialized():
            num_masks = torch.tensor(local, device=device)
            dist.all_reduce(num_masks)
            return (num_masks / dist.get_world_size()).clamp(min=1)
        return max(local, 1.0)

    def _layer_losses(self, outputs: dict, labels: Tensor, masks: Tensor, indices: tuple[Tensor, Tensor, Tensor],
                      frame_weights: Tensor, bg_weights: Tensor, num_masks: float | Tensor) -> dict[str, Tensor]:
        """labels [N], masks [N, Hpad, Wpad]: every frame's targets concatenated; indices: the
        matcher's (frame_idx, pred_idx, tgt_idx) [M] on the device."""
        batch_idx, pred_idx, tgt_idx = indices
        logits = outputs["pred_logits"].float()  # [B, Q, K+1]
        device = logits.device

        # Classification: matched queries take their target's class, the rest no-object.
        target_classes = torch.full(logits.shape[:2], self.num_classes, device=device)
        target_classes[batch_idx, pred_idx] = labels[tgt_idx]
        ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight,
                             reduction="none")  # [B, Q], already class-weighted
        unmatched = target_classes == self.num_classes
        query_weights = frame_weights[:, None] * torch.where(unmatched, bg_weights[:, None], 1.0)  # [B, Q]
        # Normaliser = F.cross_entropy's "mean" one, independent of the frame weights.
        loss_ce = (ce * query_weights).sum() / self.empty_weight[target_classes].sum()

        pred_masks = outputs["pred_masks"][batch_idx, pred_idx].float()[:, None]  # [M, 1, h, w]
        if len(pred_masks) == 0:  # a shape: known on the host
            # Keep the graph connected (DDP expects every parameter to get a gradient).
            zero = outputs["pred_masks"].float().sum() * 0.0
            return {"loss_ce": loss_ce, "loss_mask": zero, "loss_dice": zero}
        tgt_masks = masks[tgt_idx.to(masks.device)].to(pred_masks)[:, None]  # [M, 1, Hpad, Wpad]
        with torch.no_grad():
            coords = sample_uncertain_points(pred_masks, self.num_points, self.oversample_ratio,
                                             self.importance_sample_ratio)
            tgt_pts = point_sample(tgt_masks, coords)[:, 0]  # [M, P]
        pred_pts = point_sample(pred_masks, coords)[:, 0]  # [M, P]

        mask_weights = frame_weights[batch_idx]  # [M]
        bce = F.binary_cross_entropy_with_logits(pred_pts, tgt_pts, reduction="none").mean(1)
        probs = pred_pts.sigmoid()
        dice = 1 - (2 * (probs * tgt_pts).sum(1) + 1) / (probs.sum(1) + tgt_pts.sum(1) + 1)
        return {"loss_ce": loss_ce,
                "loss_mask": (mask_weights * bce).sum() / num_masks,
                "loss_dice": (mask_weights * dice).sum() / num_masks}
