"""Mask2Former's masked-attention transformer decoder (the ``sem_seg_head.predictor``).

Each layer is cross-attention (restricted to the foreground of the previous layer's mask
prediction) -> self-attention -> FFN, all post-norm with dropout 0. Layers cycle through the
three pixel-decoder scales, lowest resolution first. Names mirror detectron2 so checkpoints map 1:1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from svis_ray.model.pixel_decoder import sine_pos_embed


def _xavier_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        _xavier_(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos [B,Q,C]; memory [B,N,C]; pos [N,C]; attn_mask [B*heads,Q,N] (True = blocked)."""
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        _xavier_(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt, query_pos [B,Q,C] -> [B,Q,C]."""
        q = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        _xavier_(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    """Linear layers with ReLU in between (``mask_embed``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedAttentionDecoder(nn.Module):
    """Queries -> class logits and mask logits, after the learnable queries and after every layer.

    The pixel decoder's ``conv_dim`` equals ``hidden_dim``, so Mask2Former's ``input_proj`` would
    be identities (empty Sequentials without parameters); it is left out.
    """

    def __init__(self, hidden_dim: int, num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int,
                 mask_dim: int, num_classes: int, num_levels: int = 3):
        super().__init__()
        self.nheads, self.num_levels = nheads, num_levels
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)  # last column = no object
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def _predict(self, output: torch.Tensor, mask_features: torch.Tensor,
                 attn_size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """output [B,Q,C], mask_features [B,M,h,w] ->
        (logits [B,Q,K+1], masks [B,Q,h,w], attention mask [B*heads,Q,attn_h*attn_w] or None)."""
        x = self.decoder_norm(output)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        if attn_size is None:
            return self.class_embed(x), masks, None
        # attend only where the current mask is foreground: sigmoid(logit) < 0.5 <=> logit < 0
        blocked = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False).flatten(2).detach() < 0
        # an empty mask would block every key (NaN): attend everywhere. An elementwise AND rather
        # than an in-place boolean-index assignment, so the ONNX graph has no bool Where/ScatterND
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return self.class_embed(x), masks, blocked.repeat_interleave(self.nheads, dim=0)

    def forward(self, features: list[torch.Tensor], mask_features: torch.Tensor) -> dict:
        """features: num_levels maps [B,C,H_l,W_l] (lowest resolution first); mask_features [B,M,h,w].

        Returns ``pred_logits`` [B,Q,K+1], ``pred_masks`` [B,Q,h,w], ``pred_embds`` [B,Q,C] (final
        normed queries, used for tracking) and ``aux_outputs``: dec_layers dicts of the earlier
        predictions (the first from the learnable queries alone).
        """
        B, C = mask_features.shape[0], self.query_feat.weight.shape[1]
        sizes = [tuple(f.shape[-2:]) for f in features]
        memory = [f.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, f in enumerate(features)]
        pos = [sine_pos_embed(h, w, C, mask_features.device) for h, w in sizes]
        query_pos = self.query_embed.weight.expand(B, -1, -1)
        output = self.query_feat.weight.expand(B, -1, -1)

        n = len(self.transformer_ffn_layers)
        logits, masks, blocked = self._predict(output, mask_features, sizes[0])
        preds = [(logits, masks)]
        for i in range(n):
            lvl = i % self.num_levels
            output = self.transformer_cross_attention_layers[i](output, memory[lvl], blocked, pos[lvl], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            next_size = sizes[(i + 1) % self.num_levels] if i < n - 1 else None
            logits, masks, blocked = self._predict(output, mask_features, next_size)
            preds.append((logits, masks))
        return {
            "pred_logits": logits,
            "pred_masks": masks,
            "pred_embds": self.decoder_norm(output),
            "aux_outputs": [{"pred_logits": lg, "pred_masks": m} for lg, m in preds[:-1]],
        }
