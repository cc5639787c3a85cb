"""Mask2Former's MSDeformAttn pixel decoder, in pure PyTorch.

A deformable-attention encoder (Deformable DETR) refines res3..res5, then an FPN-style step adds
res2 and produces the stride-4 mask features. Module names mirror detectron2's
``sem_seg_head.pixel_decoder`` so Mask2Former checkpoints load 1:1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sine_pos_embed(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """DETR/Mask2Former normalised sine encoding of an HxW grid -> [H*W, dim] (y half, then x half)."""
    n = dim // 2
    dim_t = 10000 ** (2 * (torch.arange(n, dtype=torch.float32, device=device) // 2) / n)

    def encode(length: int) -> torch.Tensor:  # [length, n]: sin on even, cos on odd channels
        v = torch.arange(1, length + 1, dtype=torch.float32, device=device) / (length + 1e-6) * 2 * math.pi
        v = v[:, None] / dim_t
        return torch.stack((v[:, 0::2].sin(), v[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(h)[:, None].expand(h, w, n)
    pos_x = encode(w)[None].expand(h, w, n)
    return torch.cat((pos_y, pos_x), dim=-1).flatten(0, 1)


def level_wh(shapes: list[tuple[int, int]]) -> torch.Tensor:
    """[(H_l, W_l)] -> int64 [L, 2] of (W_l, H_l).

    While ``torch.onnx.export`` traces, the sizes are 0-dim tensors: they are stacked, so the
    graph computes them from its input, where ``torch.tensor`` would freeze the example's sizes
    (wrong sampling offsets at every other input size).
    """
    if torch.jit.is_tracing():
        return torch.stack([torch.stack((w, h)) for h, w in shapes])
    return torch.tensor([(w, h) for h, w in shapes])


def ms_deform_attn(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention core (bilinear sampling with zero padding).

    Args:
        value: [B, sum(H_l*W_l), M, D] per-head values of all levels, flattened row-major.
        shapes: [(H_l, W_l)] for the L levels.
        locations: [B, Q, M, L, P, 2] sampling points as (x, y) in [0, 1] of each level.
        weights: [B, Q, M, L, P] attention weights (softmax over L*P).
    Returns:
        [B, Q, M*D]
    """
    B, _, M, D = value.shape
    Q, L, P = locations.shape[1], locations.shape[3], locations.shape[4]
    # grid_sample with align_corners=False maps -1/+1 to the outer edges, i.e. x*W - 0.5 in pixels
    grids = (2 * locations - 1).transpose(1, 2).reshape(B * M, Q, L, P, 2)
    weights = weights.transpose(1, 2).reshape(B * M, 1, Q, L, P)
    out = value.new_zeros(B * M, D, Q)
    for lvl, v in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        v = v.permute(0, 2, 3, 1).reshape(B * M, D, *shapes[lvl])
        sampled = F.grid_sample(v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out + (sampled * weights[..., lvl, :]).sum(-1)  # [B*M, D, Q, P] -> [B*M, D, Q]
    return out.view(B, M * D, Q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query attends to P learned points per head and level."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR init: head h starts sampling along direction 2*pi*h/M, point p at distance p+1
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        grid = torch.stack((theta.cos(), theta.sin()), -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None].repeat(1, self.n_levels, self.n_points, 1)
        grid *= torch.arange(1, self.n_points + 1, dtype=torch.float32)[:, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query [B,Q,C], reference_points [B|1,Q,L|1,2] ((x, y) in [0, 1]),
        value [B,sum(H_l*W_l),C], shapes [(H_l, W_l)] -> [B,Q,C]."""
        B, Q, C = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value).view(B, -1, M, C // M)
        # Sampling in fp32 under autocast, as Mask2Former: offsets of a few pixels added to
        # coordinates in [0, 1] lose too much in half precision; the projections may run in bf16.
        with torch.autocast(query.device.type, enabled=False):
            query = query.float()
            offsets = self.sampling_offsets(query).view(B, Q, M, L, P, 2)
            weights = self.attention_weights(query).view(B, Q, M, L * P).softmax(-1).view(B, Q, M, L, P)
            # offsets are in pixels of each level: normalise by that level's (W, H)
            wh = level_wh(shapes).to(query)
            locations = reference_points.float()[:, :, None, :, None] + offsets / wh[:, None]
            sampled = ms_deform_attn(value.float(), shapes, locations, weights)
        return self.output_proj(sampled)


class EncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN (dropout 0, as Mask2Former trains it)."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, d_ffn: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """src, pos [B,N,C] -> [B,N,C]."""
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    """Encoder over L levels (Mask2Former's ``MSDeformAttnTransformerEncoderOnly``)."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, d_ffn: int, n_layers: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        # ModuleDict only to keep the checkpoint names `transformer.encoder.layers.N`
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            EncoderLayer(d_model, n_heads, n_levels, n_points, d_ffn) for _ in range(n_layers))})
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder["layers"]:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor]) -> list[torch.Tensor]:
        """srcs: L maps [B,C,H_l,W_l] -> the encoded maps, same shapes."""
        B, C = srcs[0].shape[:2]
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        device = srcs[0].device
        x = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # [B, N, C]
        pos = torch.cat([sine_pos_embed(h, w, C, device) + self.level_embed[i] for i, (h, w) in enumerate(shapes)])
        # every token's reference point is its own pixel centre, in [0, 1] (no padding mask: the
        # padded area is attended to, as in Mask2Former)
        ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(w, device=device) + 0.5) / w,
                                                    (torch.arange(h, device=device) + 0.5) / h,
                                                    indexing="xy"), -1).flatten(0, 1) for h, w in shapes])
        ref = ref[None, :, None]  # [1, N, 1, 2], the same point on every level
        for layer in self.encoder["layers"]:
            x = layer(x, pos, ref, shapes)
        return [y.transpose(1, 2).reshape(B, C, h, w) for y, (h, w) in zip(x.split([h * w for h, w in shapes], 1), shapes)]


class ConvNorm(nn.Conv2d):
    """Bias-free conv + GroupNorm (+ ReLU), with the norm as child ``norm`` as in detectron2's Conv2d."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, relu: bool = False):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, c_out)
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)  # detectron2's c2_xavier_fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class PixelDecoder(nn.Module):
    """res2..res5 -> stride-4 mask features + three encoded scales (strides 32, 16, 8).

    ``input_proj[0]`` projects res5, ``[1]`` res4, ``[2]`` res3 (lowest resolution first, as in
    Mask2Former). res2 joins FPN-style: ``adapter_1`` (lateral 1x1) + upsampled stride-8 map,
    then ``layer_1`` (3x3); ``mask_features`` is a 1x1 conv on the result.
    """

    def __init__(self, in_channels: list[int], conv_dim: int, mask_dim: int, n_heads: int, n_points: int,
                 d_ffn: int, n_layers: int):
        super().__init__()
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, 1), nn.GroupNorm(32, conv_dim)) for c in in_channels[:0:-1])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.transformer = DeformableEncoder(conv_dim, n_heads, len(self.input_proj), n_points, d_ffn, n_layers)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)
        self.adapter_1 = ConvNorm(in_channels[0], conv_dim, 1)
        self.layer_1 = ConvNorm(conv_dim, conv_dim, 3, relu=True)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """feats [res2, res3, res4, res5] ->
        (mask_features [B,mask_dim,H/4,W/4], [res5', res4', res3'] each [B,conv_dim,H_l,W_l])."""
        # Under autocast the convolutions and linear layers run in half precision and the
        # deformable sampling in fp32 (MSDeformAttn.forward); GroupNorm/LayerNorm autocast to fp32.
        multi_scale = self.transformer([proj(f) for proj, f in zip(self.input_proj, feats[:0:-1])])
        res2 = self.adapter_1(feats[0])
        y = res2 + F.interpolate(multi_scale[-1].to(res2.dtype), size=res2.shape[-2:], mode="bilinear",
                                 align_corners=False)
        return self.mask_features(self.layer_1(y)), multi_scale
