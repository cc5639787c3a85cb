"""The MinVIS per-frame model (a Mask2Former instance segmenter), its config and presets.

MinVIS has no temporal module: frames are segmented independently and instances are tracked
at inference by matching ``pred_embds`` between consecutive frames.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from svis_ray.data.transforms import pad_to_multiple
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
    freeze_at: int = 0  # MinVIS/Mask2Former FREEZE_AT 0: every stage trains (batch norm stays frozen)
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


def preprocess(images: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The model's input from padded uint8 frames: normalise, then zero the padding.

    images: uint8 (or float 0..255) RGB [B,3,H,W], H and W multiples of 32, frame i's pixels in
    ``[:h_i, :w_i]``; sizes: B (h_i, w_i). Returns float32 [B,3,H,W] on the same device:
    ``(x - PIXEL_MEAN) / PIXEL_STD`` inside each frame and exactly 0 outside, as detectron2
    (normalise, then ``ImageList.from_tensors`` pads with 0, which is the mean colour). Padding
    the uint8 frames and normalising after would give the border -mean/std, which the COCO
    weights never saw. This is the only way frames become model input (training, evaluation,
    teachers, prediction); ``preprocess_frames`` is the same for a list of unpadded frames.
    """
    if images.shape[0] != len(sizes):
        raise ValueError(f"{images.shape[0]} images but {len(sizes)} sizes")
    mean = torch.tensor(PIXEL_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device).view(3, 1, 1)
    x = (images.float() - mean) / std
    for i, (h, w) in enumerate(sizes):
        x[i, :, h:, :] = 0.0
        x[i, :, :, w:] = 0.0
    return x


def preprocess_frames(frames: Sequence[np.ndarray | torch.Tensor],
                      device: torch.device | str | None = None, size_multiple: int = 32) -> torch.Tensor:
    """``preprocess`` for unpadded uint8 RGB frames [h_i,w_i,3] (sizes may differ): the batch is
    zero-padded to the largest frame rounded up to ``size_multiple`` (a multiple of 32; a compiled
    model takes a larger one so that few shapes reach it), moved to ``device`` as uint8, then
    normalised there. Returns float32 [B,3,H,W]."""
    sizes = [(int(f.shape[0]), int(f.shape[1])) for f in frames]
    hp, wp = pad_to_multiple(max(h for h, _ in sizes), max(w for _, w in sizes), size_multiple)
    batch = np.zeros((len(frames), 3, hp, wp), np.uint8)
    for i, (f, (h, w)) in enumerate(zip(frames, sizes)):
        batch[i, :, :h, :w] = np.asarray(f).transpose(2, 0, 1)  # a copy: Ray hands read-only arrays
    x = torch.from_numpy(batch)
    return preprocess(x.to(device) if device is not None else x, sizes)


class MinVIS(nn.Module):
    """Backbone -> ``sem_seg_head.pixel_decoder`` -> ``sem_seg_head.predictor`` (detectron2 names).

    ``forward`` takes the *preprocessed* input (``preprocess``): float32, normalised with
    ``PIXEL_MEAN``/``PIXEL_STD`` (0..255 RGB), zero outside each frame, H and W multiples of 32.
    An exported or compiled model keeps that contract; the constants are this module's.
    """

    preprocess = staticmethod(preprocess)

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

    def forward(self, x: torch.Tensor) -> dict:
        """x [B,3,H,W] float, from ``preprocess`` (normalised, zero-padded, H and W multiples of 32).

        Returns ``pred_logits`` [B,Q,K+1], ``pred_masks`` [B,Q,H/4,W/4] (logits), ``pred_embds``
        [B,Q,hidden_dim] and ``aux_outputs`` (dec_layers dicts of ``pred_logits``/``pred_masks``).
        """
        if not x.is_floating_point():
            raise TypeError(f"MinVIS.forward takes the preprocessed float input (svis_ray.model.preprocess), "
                            f"got {x.dtype}")
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
