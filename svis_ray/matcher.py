"""Hungarian matching between per-frame query predictions and ground-truth (or pseudo) instances.

Mask2Former-style: class cost plus sigmoid-BCE and dice mask costs, the mask costs evaluated on a
shared set of random points instead of full masks, so the cost is cheap and resolution-free.

The costs of every frame and every decoder layer of a step are computed on the device, padded to
the frame with the most targets, and cross to the host in *one* copy; scipy solves each matrix and
the indices go back in one copy. A per-matrix ``.cpu()`` would stall the GPU ~80 times a step.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample maps at normalised points.

    inputs: [N, C, H, W]; coords: [N, P, 2] as (x, y) in [0, 1]. Returns [N, C, P].
    ``align_corners=False`` makes a coordinate mean the same image location at every resolution,
    so low-res predictions and 4x targets are sampled at the same places.
    """
    grid = 2.0 * coords.unsqueeze(2) - 1.0  # [N, P, 1, 2] in grid_sample's [-1, 1]
    return F.grid_sample(inputs, grid, align_corners=False).squeeze(3)


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE of each prediction against each target. logits [..., Q, P], targets [..., N, P] -> [..., Q, N]."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.mT + neg @ (1 - targets).mT) / logits.shape[-1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of each prediction against each target. logits [..., Q, P], targets [..., N, P] -> [..., Q, N]."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.mT
    denominator = probs.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, independently per frame and decoder layer."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def costs(self, layers: list[dict], targets: list[dict], coords: Tensor | None = None) -> Tensor:
        """Cost matrices of every layer and frame, fp32 even under autocast (BCE/dice sums lose
        precision in half types): [L, B, Q, Nmax], frame b's targets in columns ``:N_b``, the rest 0.

        layers: L dicts with ``pred_logits`` [B,Q,K+1] and ``pred_masks`` [B,Q,h,w]; targets as in
        ``forward``; coords: [L, B, P, 2] sample points in [0, 1] (default: uniform random).
        """
        counts = [len(t["labels"]) for t in targets]  # shapes: known on the host, no sync
        ref = layers[0]["pred_masks"]
        L, B, Q = len(layers), ref.shape[0], ref.shape[1]
        if coords is None:
            coords = torch.rand(L, B, self.num_points, 2, device=ref.device)
        P = coords.shape[2]
        labels = pad_sequence([t["labels"].to(ref.device) for t in targets], batch_first=True)  # [B, Nmax]
        # Each target is sampled at its frame's points of every layer in one grid_sample: [N, L*P].
        tgt_masks = torch.cat([t["masks"] for t in targets]).to(ref.device, torch.float32)[:, None]
        frame_coords = coords.transpose(0, 1).reshape(B, L * P, 2)
        frame_of = torch.repeat_interleave(torch.arange(B, device=ref.device),
                                           torch.tensor(counts, device=ref.device), output_size=sum(counts))
        tgt_pts = point_sample(tgt_masks, frame_coords[frame_of])[:, 0]
        tgt_pts = pad_sequence(list(tgt_pts.split(counts)), batch_first=True).view(B, -1, L, P)  # [B, Nmax, L, P]
        cost = []
        for i, layer in enumerate(layers):
            probs = layer["pred_logits"].float().softmax(-1)  # [B, Q, K+1]
            pred_pts = point_sample(layer["pred_masks"].float(), coords[i])  # [B, Q, P]
            tgt = tgt_pts[:, :, i]  # [B, Nmax, P]
            cost.append(-self.cost_class * probs.gather(2, labels[:, None].expand(-1, Q, -1))
                        + self.cost_mask * pairwise_sigmoid_ce(pred_pts, tgt)
                        + self.cost_dice * pairwise_dice(pred_pts, tgt))
        return torch.stack(cost)

    @torch.no_grad()
    def match(self, layers: list[dict], targets: list[dict], coords: Tensor | None = None
              ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer: (frame_idx [M], pred_idx [M], tgt_idx [M]) int64 on the predictions' device,
        tgt_idx indexing the targets of all frames concatenated; M = sum_b min(Q, N_b).

        One device->host copy of all costs, one host->device copy of all indices.
        """
        device = layers[0]["pred_logits"].device
        counts = [len(t["labels"]) for t in targets]
        if sum(counts) == 0:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return [(empty, empty, empty)] * len(layers)
        cost = self.costs(layers, targets, coords).cpu().numpy()
        offsets = np.cumsum([0] + counts[:-1])
        parts = []  # per layer: frame, pred, tgt index arrays
        for c in cost:
            rows = [(b, *linear_sum_assignment(c[b, :, :n])) for b, n in enumerate(counts) if n]
            parts.append(np.concatenate([np.stack([np.full(len(p), b), p, t + offsets[b]]) for b, p, t in rows], 1))
        sizes = [p.shape[1] for p in parts]
        flat = torch.from_numpy(np.concatenate(parts, 1).astype(np.int64)).to(device, non_blocking=True)
        return [tuple(chunk) for chunk in flat.split(sizes, 1)]

    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """
        outputs: ``pred_logits`` [B, Q, K+1] (last = no-object), ``pred_masks`` [B, Q, h, w] logits.
        targets: B dicts with ``labels`` [N] and ``masks`` [N, Hpad, Wpad] (bool/uint8/float).
        Returns B pairs (pred_idx [M], tgt_idx [M]) of int64 CPU tensors, M = min(Q, N), the
        final layer only (``match`` gives every layer at once, on the device).
        """
        frame, pred, tgt = (x.cpu() for x in self.match([outputs], targets)[0])
        offsets = np.cumsum([0] + [len(t["labels"]) for t in targets])
        return [(pred[frame == b], tgt[frame == b] - int(offsets[b])) for b in range(len(targets))]
