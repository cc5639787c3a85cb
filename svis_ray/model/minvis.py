"""The MinVIS per-frame model (a Mask2Former instance segmenter), its config and presets.

MinVIS has no temporal module: frames are segmented independently and instances are tracked
at inference by matching ``pred_embds`` between consecutive frames.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from svis_ray.errors import SvisError
from svis_ray.model.backbone import Backbone
from svis_ray.model.pixel_decoder import PixelDecoder
from svis_ray.model.transformer_decoder import MaskedAttentionDecoder

PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet statistics on 0..255 RGB (detectron2 / torchvision)
PIXEL_STD = (58.395, 57.12, 57.375)
_CHOICES = {"backbone": ("resnet50", "resnet18"), "backbone_norm": ("frozen_bn", "gn")}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; the defaults are Mask2Former/MinVIS R50 (``minvis_r50``)."""

    backbone: str = "resnet50"
    backbone_norm: str = "frozen_bn"
    freeze_at: int = 2  # detectron2: stem and res2 frozen
    hidden_dim: int = 256  # also the pixel decoder's conv_dim
    num_queries: int = 100
    dec_layers: int = 9  # masked-attention layers (detectron2's DEC_LAYERS - 1)
    enc_layers: int = 6  # deformable encoder layers
    nheads: int = 8
    dim_feedforward: int = 2048
    enc_dim_feedforward: int = 1024
    enc_n_points: int = 4
    mask_dim: int = 256
    num_classes: int = 40  # K, without the no-object class
    backbone_weights: str | None = None  # local file, any format load_pretrained reads

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _CHOICES and value not in _CHOICES[f.name]:
                raise SvisError(f"model config: {f.name} must be one of {', '.join(_CHOICES[f.name])}, got {value!r}")
            if f.type == "int" and (type(value) is not int or value < (0 if f.name == "freeze_at" else 1)):
                raise SvisError(f"model config: {f.name} must be a positive integer, got {value!r}")
        if self.freeze_at > 5:
            raise SvisError(f"model config: freeze_at must be 0..5, got {self.freeze_at}")
        if self.hidden_dim % 32 or self.hidden_dim % self.nheads:
            # GroupNorm(32) in the pixel decoder; equal head widths
            raise SvisError(f"model config: hidden_dim must be divisible by 32 and by nheads, got {self.hidden_dim}")


PRESETS: dict[str, ModelConfig] = {
    "minvis_r50": ModelConfig(),
    # CPU-trainable from scratch in minutes
    "tiny": ModelConfig(backbone="resnet18", backbone_norm="gn", freeze_at=0, hidden_dim=64, mask_dim=64,
                        num_queries=20, dec_layers=3, enc_layers=2, nheads=4, dim_feedforward=256,
                        enc_dim_feedforward=256),
}


class MinVIS(nn.Module):
    """Backbone -> ``sem_seg_head.pixel_decoder`` -> ``sem_seg_head.predictor`` (detectron2 names)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.backbone = Backbone(c.backbone, c.backbone_norm, c.freeze_at)
        self.sem_seg_head = nn.ModuleDict({
            "pixel_decoder": PixelDecoder(self.backbone.channels, c.hidden_dim, c.mask_dim, c.nheads,
                                          c.enc_n_points, c.enc_dim_feedforward, c.enc_layers),
            "predictor": MaskedAttentionDecoder(c.hidden_dim, c.num_queries, c.nheads, c.dim_feedforward,
                                                c.dec_layers, c.mask_dim, c.num_classes),
        })
        # non-persistent: constants, and detectron2 state dicts do not carry them either
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict:
        """images [B,3,H,W] RGB 0..255 (float or uint8), H and W multiples of 32.

        Returns ``pred_logits`` [B,Q,K+1], ``pred_masks`` [B,Q,H/4,W/4] (logits), ``pred_embds``
        [B,Q,hidden_dim] and ``aux_outputs`` (dec_layers dicts of ``pred_logits``/``pred_masks``).
        """
        x = (images.float() - self.pixel_mean) / self.pixel_std
        mask_features, multi_scale = self.sem_seg_head["pixel_decoder"](self.backbone(x))
        return self.sem_seg_head["predictor"](multi_scale, mask_features)


def build_model(preset: str | ModelConfig, num_classes: int, **overrides) -> MinVIS:
    """Build a MinVIS from a preset name (see ``PRESETS``) or a config, with field overrides.

    If ``backbone_weights`` is set, those weights are loaded (``load_pretrained``).
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise SvisError(f"unknown model preset {preset!r} (available: {', '.join(PRESETS)})")
        preset = PRESETS[preset]
    unknown = sorted(set(overrides) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise SvisError(f"unknown model option(s) {', '.join(unknown)} "
                        f"(valid: {', '.join(f.name for f in fields(ModelConfig))})")
    config = replace(preset, **{**overrides, "num_classes": num_classes})
    model = MinVIS(config)
    if config.backbone_weights:
        from svis_ray.model.checkpoint import load_pretrained  # checkpoint imports this module

        load_pretrained(model, config.backbone_weights)
    return model
