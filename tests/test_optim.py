import copy

import pytest
import torch
from torch import nn

from svis_ray.losses import SetCriterion
from svis_ray.matcher import HungarianMatcher
from svis_ray.optim import build_optimizer, build_scheduler, train_step

Q, K, D = 4, 3, 8


class TinyModel(nn.Module):
    """Smallest module with the student's output contract and parameter naming."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, D, 4, stride=4), nn.GroupNorm(2, D))
        self.query_embed = nn.Embedding(Q, D)
        self.decoder_norm = nn.LayerNorm(D)
        self.class_head = nn.Linear(D, K + 1)
        self.frozen = nn.Linear(D, D)
        self.frozen.requires_grad_(False)

    def forward(self, images):
        feats = self.backbone(images / 255.0)  # [B, D, H/4, W/4]
        queries = self.decoder_norm(self.query_embed.weight + feats.mean((2, 3))[:, None])  # [B, Q, D]
        logits = self.class_head(queries)
        masks = torch.einsum("bqd,bdhw->bqhw", queries, feats)
        return {"pred_logits": logits, "pred_masks": masks, "pred_embds": queries,
                "aux_outputs": [{"pred_logits": logits, "pred_masks": masks}]}


def batch():
    g = torch.Generator().manual_seed(0)
    images = 255 * torch.rand(2, 3, 32, 32, generator=g)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16, :16] = masks[1, 8:, 20:] = True
    targets = [{"labels": torch.tensor([1, 2]), "masks": masks},
               {"labels": torch.tensor([0]), "masks": masks[1:], "weight": 0.5}]
    return images, targets


def criterion():
    return SetCriterion(K, HungarianMatcher(num_points=256), num_points=256)


def test_parameter_groups():
    model = TinyModel()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    expected = {  # name: (lr, weight decay)
        "backbone.0.weight": (1e-5, 0.05), "backbone.0.bias": (1e-5, 0.05),
        "backbone.1.weight": (1e-5, 0.0), "backbone.1.bias": (1e-5, 0.0),  # norm
        "query_embed.weight": (1e-4, 0.0), "decoder_norm.weight": (1e-4, 0.0),
        "decoder_norm.bias": (1e-4, 0.0), "class_head.weight": (1e-4, 0.05),
        "class_head.bias": (1e-4, 0.05),
    }
    for name, param in model.named_parameters():
        if name.startswith("frozen."):
            assert id(param) not in group_of
            continue
        group = group_of[id(param)]
        assert (group["lr"], group["weight_decay"]) == pytest.approx(expected[name]), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(expected)


def test_scheduler_warmup_and_milestones():
    optimizer = build_optimizer(TinyModel(), lr=1e-4)
    scheduler = build_scheduler(optimizer, max_steps=40, warmup_steps=10, warmup_factor=0.001,
                                milestones=(20, 30), gamma=0.1)
    lrs = []
    for _ in range(40):
        lrs.append(sorted(g["lr"] for g in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    factor = {0: 0.001, 5: 0.001 * 0.5 + 0.5, 10: 1.0, 19: 1.0, 20: 0.1, 29: 0.1, 30: 0.01, 39: 0.01}
    for step, f in factor.items():
        assert lrs[step][0] == pytest.approx(1e-5 * f), step  # backbone keeps its 0.1 ratio
        assert lrs[step][-1] == pytest.approx(1e-4 * f), step
    with pytest.raises(ValueError):
        build_scheduler(optimizer, max_steps=10, milestones=(20,))


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = build_optimizer(model, lr=1e-2)
    scheduler = build_scheduler(optimizer, max_steps=12)
    images, targets = batch()
    crit = criterion()
    history = [train_step(model, crit, optimizer, scheduler, images, targets) for _ in range(12)]

    assert set(history[0]) == {"loss_ce", "loss_mask", "loss_dice", "loss", "lr", "grad_norm"}
    # 0-dim device tensors (read once per log window: a float per step would sync the host), lr a float
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
               for k, v in history[0].items() if k != "lr")
    assert isinstance(history[0]["lr"], float)
    assert history[0]["lr"] == pytest.approx(1e-2)
    assert sum(h["loss"] for h in history[-3:]) / 3 < 0.7 * history[0]["loss"]


def test_clipping_bounds_the_applied_gradient():
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # update == -gradient
    scheduler = build_scheduler(optimizer, max_steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    images, targets = batch()
    stats = train_step(model, criterion(), optimizer, scheduler, images, targets, clip_norm=0.01)

    applied = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]).norm()
    assert stats["grad_norm"] > 0.01  # clipping was active
    assert applied.item() == pytest.approx(0.01, rel=1e-4)


def test_fp16_falls_back_to_fp32_on_cpu():
    torch.manual_seed(0)
    model = TinyModel()
    twin = copy.deepcopy(model)
    images, targets = batch()
    results = []
    for m, precision in ((model, "fp16"), (twin, "fp32")):
        optimizer = build_optimizer(m)
        torch.manual_seed(1)
        results.append(train_step(m, criterion(), optimizer, build_scheduler(optimizer, 5),
                                  images, targets, precision=precision))
    assert results[0] == results[1]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_ema_momentum_ramps_so_the_teacher_forgets_the_random_init():
    from svis_ray.train import ema_momentum

    assert ema_momentum(1, 0.99) == 0.0  # the first update copies the student
    assert ema_momentum(4, 0.99) == 0.75 and ema_momentum(1000, 0.99) == 0.99
    # Running the update with the ramp gives the plain mean of the student's weights so far.
    ema, history = 0.0, [3.0, 5.0, 7.0, 9.0]
    for step, w in enumerate(history, start=1):
        m = ema_momentum(step, 0.99)
        ema = m * ema + (1 - m) * w
    assert abs(ema - sum(history) / len(history)) < 1e-12
