"""Rewrites of the decoder for the torch backend: the same arithmetic in fewer, cheaper kernels.

Measured on the H200 at 1008 (tools/profile_stages.py --graphs, one frame x 4 classes), these
three spots cost ~1.4 ms of the decoder's 8.5 ms while doing almost no arithmetic:

- :class:`ChannelsLastGroupNorm`: inductor reduced the pixel decoder's GroupNorm (8 groups of
  32 channels over a channels-last [C, 256, 288, 288] map) group by group, reading 64-byte
  pieces 512 bytes apart: 0.55 ms for one 170 MB read. Per-channel moments are an outer
  reduction that reads the map in order; the group statistics follow from them exactly
  (equal channel counts: group mean = mean of channel means, group E[x^2] likewise).
- :class:`PointwiseRpbMLP`: the box relative-position MLPs (2 -> 256 -> 8, per query and grid
  line, 12 per frame) ran as a K=2 GEMM, a ReLU pass over its [C, 200, 72, 256] output and a
  second GEMM. Written as broadcasts and a sum over the 256 hidden units, inductor makes them
  one kernel that never stores the hidden layer.
- :func:`fuse_encoder_relu`: the DETR encoder MLP's ReLU in its first GEMM's epilogue
  (runtime/fused_mlp.py), sparing a pass over the [C, 5184, 2048] activation per layer; kept
  only where timing says it pays.

The rewrites are meant for compiled CUDA graphs; the eager CPU path keeps transformers' modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sam3stream.runtime.fused_mlp import FusedMLP

__all__ = ["ChannelsLastGroupNorm", "PointwiseRpbMLP", "fuse_encoder_relu", "rewrite_decoder"]


class ChannelsLastGroupNorm(nn.Module):
    """nn.GroupNorm with its statistics computed from per-channel moments (float32)."""

    def __init__(self, norm: nn.GroupNorm) -> None:
        super().__init__()
        if not norm.affine:
            raise TypeError("expected an affine GroupNorm")
        self.groups, self.eps = int(norm.num_groups), float(norm.eps)
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        # A view for a channels-last map: [N, H*W, C] with C contiguous.
        flat = x.permute(0, 2, 3, 1).reshape(n, h * w, c).float()
        var_c, mean_c = torch.var_mean(flat, dim=1, correction=0)  # [N, C]
        grouped = (n, self.groups, c // self.groups)
        mean_g = mean_c.view(grouped).mean(-1, keepdim=True)
        square_g = (var_c + mean_c.square()).view(grouped).mean(-1, keepdim=True)
        inv_std = torch.rsqrt((square_g - mean_g.square()).clamp_min(0) + self.eps)
        scale = (inv_std * self.weight.float().view(1, self.groups, -1)).view(n, c)
        shift = self.bias.float() - (mean_g * inv_std * self.weight.float().view(1, self.groups, -1)).view(
            n, c
        )
        out = x.float() * scale[:, :, None, None] + shift[:, :, None, None]
        return out.to(x.dtype)


class PointwiseRpbMLP(nn.Module):
    """Sam3DecoderMLP with two inputs and two layers (Linear(2, H), ReLU, Linear(H, heads)),
    written as broadcasts and a reduction instead of GEMMs."""

    def __init__(self, mlp: Any) -> None:
        super().__init__()
        if getattr(mlp, "layer3", None) is not None or mlp.layer1.in_features != 2:
            raise TypeError("expected a two-layer MLP with two inputs (the box RPB embedding)")
        self.layer1, self.layer2 = mlp.layer1, mlp.layer2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, b1 = self.layer1.weight, self.layer1.bias  # [H, 2], [H]
        hidden = torch.relu(x[..., :1] * w1[:, 0] + x[..., 1:] * w1[:, 1] + b1)  # [..., H]
        out: torch.Tensor = (hidden.unsqueeze(-2) * self.layer2.weight).sum(-1) + self.layer2.bias
        return out  # [..., heads]


def fuse_encoder_relu(detr_encoder: nn.Module) -> int:
    """Give every DETR encoder layer a ReLU :class:`FusedMLP`; returns the count."""
    count = 0
    for layer in getattr(detr_encoder, "layers", ()):
        if not isinstance(layer.mlp, FusedMLP):
            layer.mlp = FusedMLP(layer.mlp, "relu")
            count += 1
    return count


def rewrite_decoder(decoder: Any) -> dict[str, int]:
    """Swap in :class:`ChannelsLastGroupNorm` (pixel decoder) and :class:`PointwiseRpbMLP` (DETR
    decoder) on a :class:`~sam3stream.model.parts.Decoder`; returns what was replaced."""
    norms = decoder.pixel_decoder.norms
    done = {"group_norms": 0, "rpb_mlps": 0}
    for index, norm in enumerate(norms):
        if isinstance(norm, nn.GroupNorm):
            norms[index] = ChannelsLastGroupNorm(norm)
            done["group_norms"] += 1
    detr = decoder.detr_decoder
    for name in ("box_rpb_embed_x", "box_rpb_embed_y"):
        if not isinstance(getattr(detr, name), PointwiseRpbMLP):
            setattr(detr, name, PointwiseRpbMLP(getattr(detr, name)))
            done["rpb_mlps"] += 1
    return done
