"""Optimiser, learning-rate schedule and one training step, following the MinVIS recipe.

AdamW (lr 1e-4, weight decay 0.05, backbone lr x0.1; fused on CUDA), linear warm-up then step
decay, and full-model gradient clipping at L2 norm 0.01. Precision: ``svis_ray.accel``.
"""

import bisect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from svis_ray.accel import autocast
from svis_ray.losses import SetCriterion

# Mask2Former trains norm layers and learned embeddings (queries, level embeddings) without
# weight decay (its WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0): decaying a norm's scale or a
# query vector towards zero changes what the layer computes instead of regularising it.
NO_DECAY_MODULES = (
    nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm, nn.RMSNorm, nn.Embedding,
)


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.05,
                    backbone_multiplier: float = 0.1) -> torch.optim.AdamW:
    """AdamW with up to four parameter groups: (backbone or not) x (decayed or not); fused (one
    kernel for all parameters, step counters on the device) when the parameters are on CUDA."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()  # shared parameters must be in exactly one group
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            group_lr = lr * backbone_multiplier if name.startswith("backbone.") else lr
            group_wd = 0.0 if isinstance(module, NO_DECAY_MODULES) else weight_decay
            groups.setdefault((group_lr, group_wd), []).append(param)
    cuda = all(p.is_cuda for params in groups.values() for p in params)
    return torch.optim.AdamW(
        [{"params": params, "lr": group_lr, "weight_decay": group_wd}
         for (group_lr, group_wd), params in groups.items()], lr=lr, fused=cuda or None)


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, warmup_steps: int = 10,
                    warmup_factor: float = 1.0, milestones: Sequence[int] = (),
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``warmup_factor`` x lr to lr, then x ``gamma`` at each milestone.

    Same multiplier as detectron2's WarmupMultiStepLR; with MinVIS's warmup_factor 1.0 the warm-up
    is a no-op. Call ``step()`` once per training step.
    """
    milestones = sorted(milestones)
    if milestones and milestones[-1] > max_steps:
        raise ValueError(f"milestones {milestones} lie beyond max_steps={max_steps}")

    def factor(step: int) -> float:
        warmup = 1.0
        if step < warmup_steps:
            alpha = step / warmup_steps
            warmup = warmup_factor * (1 - alpha) + alpha
        return warmup * gamma ** bisect.bisect_right(milestones, step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(model: nn.Module, criterion: SetCriterion, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, images: Tensor,
               targets: list[dict] | Callable[[dict], list[dict]], scaler: torch.amp.GradScaler | None = None,
               clip_norm: float = 0.01, precision: str = "fp32") -> dict[str, Tensor | float]:
    """One optimisation step on a batch of frames (the model must already be in train mode).

    images: [B, 3, H, W] the model's input from ``svis_ray.model.preprocess`` (normalised, zero-padded
    to multiples of 32); targets: B frame dicts as for ``SetCriterion``, or a function of the model
    outputs returning them (the Sparse-MinVIS online recipe labels unlabelled frames from the very
    forward pass it trains). ``precision``: ``svis_ray.accel`` (``fp16`` only on CUDA, where
    ``scaler`` must be a GradScaler kept across steps: its loss scale adapts over time).

    Returns the final-layer ``loss_ce``, ``loss_mask``, ``loss_dice``, the weighted total ``loss``
    and the pre-clipping ``grad_norm`` as detached 0-dim device tensors (reading them syncs the
    host with the device: accumulate them and read once per log window), and the ``lr`` (float)
    of the non-backbone parameters used for this step. The step itself reads nothing back but the
    matcher's costs (one copy).
    """
    device = next(model.parameters()).device
    use_scaler = precision == "fp16" and device.type == "cuda"
    if use_scaler and scaler is None:
        raise ValueError("precision fp16 on CUDA needs a torch.amp.GradScaler kept across steps")
    with autocast(precision, device):
        outputs = model(images)
    if callable(targets):
        targets = targets(outputs)
    losses = criterion(outputs, targets)  # fp32: the criterion and matcher cast their inputs
    loss = criterion.total(losses)

    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if use_scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True if device.type == "cuda" else None)
    lr = max(group["lr"] for group in optimizer.param_groups)
    if use_scaler:
        scaler.step(optimizer)  # skipped when the gradients overflowed (GradScaler syncs here)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()

    result: dict[str, Tensor | float] = {name: losses[name].detach() for name in ("loss_ce", "loss_mask", "loss_dice")}
    result.update(loss=loss.detach(), lr=lr, grad_norm=grad_norm.detach())
    return result
