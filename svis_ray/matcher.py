"""Hungarian matching between per-frame query predictions and ground-truth (or pseudo) instances.

Mask2Former-style: class cost plus sigmoid-BCE and dice mask costs, the mask costs evaluated on a
shared set of random points instead of full masks, so the cost is cheap and resolution-free.
"""

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample maps at normalised points.

    inputs: [N, C, H, W]; coords: [N, P, 2] as (x, y) in [0, 1]. Returns [N, C, P].
    ``align_corners=False`` makes a coordinate mean the same image location at every resolution,
    so low-res predictions and 4x targets are sampled at the same places.
    """
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # [N, P, 1, 2] in grid_sample's [-1, 1]
    return F.grid_sample(inputs, grid, align_corners=False).squeeze(3)


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE of each prediction against each target. logits [Q, P], targets [N, P] -> [Q, N]."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of each prediction against each target. logits [Q, P], targets [N, P] -> [Q, N]."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, independently per frame."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """
        outputs: ``pred_logits`` [B, Q, K+1] (last = no-object), ``pred_masks`` [B, Q, h, w] logits.
        targets: B dicts with ``labels`` [N] and ``masks`` [N, Hpad, Wpad] (bool/uint8/float).
        Returns B pairs (pred_idx [M], tgt_idx [M]) of int64 CPU tensors, M = min(Q, N).
        """
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if len(labels) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            # Costs in fp32 even under AMP: BCE/dice sums overflow or lose precision in fp16.
            probs = outputs["pred_logits"][b].float().softmax(-1)  # [Q, K+1]
            pred_masks = outputs["pred_masks"][b].float()[:, None]  # [Q, 1, h, w]
            tgt_masks = target["masks"].to(pred_masks)[:, None]  # [N, 1, Hpad, Wpad]

            coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
            pred_pts = point_sample(pred_masks, coords.expand(len(pred_masks), -1, -1))[:, 0]
            tgt_pts = point_sample(tgt_masks, coords.expand(len(tgt_masks), -1, -1))[:, 0]

            cost = (-self.cost_class * probs[:, labels]
                    + self.cost_mask * pairwise_sigmoid_ce(pred_pts, tgt_pts)
                    + self.cost_dice * pairwise_dice(pred_pts, tgt_pts))  # [Q, N]
            pred_idx, tgt_idx = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(pred_idx, dtype=torch.int64),
                            torch.as_tensor(tgt_idx, dtype=torch.int64)))
        return indices
