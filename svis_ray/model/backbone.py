"""ResNet backbone: torchvision's ResNet returning the res2..res5 feature maps.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so an ImageNet
state dict loads unchanged; detectron2 names are translated by ``checkpoint.map_detectron2_key``.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d

_ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class Backbone(ResNet):
    """ResNet without ``avgpool``/``fc``.

    Args:
        name: "resnet18" | "resnet50".
        norm: "frozen_bn" (fixed ImageNet statistics, as in detectron2) or "gn" (GroupNorm 32,
            trainable from scratch: frozen BN with random statistics would never train).
        freeze_at: detectron2 semantics: 0 trains everything, 1 freezes the stem, 2 also res2, ...
    """

    def __init__(self, name: str, norm: str, freeze_at: int):
        block, layers = _ARCHS[name]
        super().__init__(block, layers, norm_layer=FrozenBatchNorm2d if norm == "frozen_bn" else _group_norm)
        del self.avgpool, self.fc
        self.channels = [64 * block.expansion * 2**i for i in range(4)]  # res2..res5
        stages = [(self.conv1, self.bn1), (self.layer1,), (self.layer2,), (self.layer3,), (self.layer4,)]
        for stage in stages[:freeze_at]:
            for module in stage:
                module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B,3,H,W] (normalised) -> [res2 [B,C2,H/4,W/4], res3 (H/8), res4 (H/16), res5 (H/32)]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats
