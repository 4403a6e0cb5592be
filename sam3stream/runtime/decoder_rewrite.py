"""Rewrites of the decoder for the torch backend: the same arithmetic in fewer, cheaper kernels.

From the kernel profile of one decoder step on the H200 at 1008 (tools/profile_stages.py
--graphs, one frame x 4 classes; docs/bench/graphs_1008.json, graphs_fused_1008.json):

- :class:`ChannelsLastGroupNorm`: inductor reduced the pixel decoder's GroupNorm (8 groups of
  32 channels over a channels-last [C, 256, 288, 288] map) group by group, reading 64-byte
  pieces 512 bytes apart: 0.55 ms for one 170 MB read. Per-channel moments are an outer
  reduction that reads the map in order; the group statistics follow from them exactly
  (equal channel counts: group mean = mean of channel means, group E[x^2] likewise).
  GroupNorm kernels per frame: 0.95 -> 0.49 ms.
- :func:`fuse_encoder_relu`: the DETR encoder MLP's ReLU in its first GEMM's epilogue
  (runtime/fused_mlp.py), sparing a pass over the [C, 5184, 2048] activation per layer
  (0.42 ms per frame); kept only where timing at start says it pays.

- :class:`KernelAttention`: the DETR encoder's self-attention (8 heads of 32 over all image
  tokens) through our Triton kernel (runtime/attention_kernel.py), 1.38x cuDNN's time at 1008
  (docs/bench/attention_kernel_1008.json); kept only where timing at start says it pays.

The box-RPB MLPs (2 -> 256 -> 8 per query and grid line) were rewritten too, as broadcasts and a
sum, so that inductor would not store the hidden layer: its two looped reductions took 1.69 ms per
frame where the K=2 GEMM and ReLU pass they replace took 0.49 ms, so that rewrite was dropped.

On by default (TorchOptions.fused_decoder; bench --no-fused-decoder to compare): at 1008 x 8
on the H200, with the GELU form pinned on both sides, 48.6 -> 50.0 frames/s and, in the
reverse order, 48.5 -> 49.7, in the same memory. Meant for compiled CUDA graphs; the eager CPU
path keeps transformers' modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sam3stream.runtime import attention_kernel
from sam3stream.runtime.fused_mlp import fuse_layer_mlps

__all__ = [
    "ChannelsLastGroupNorm",
    "KernelAttention",
    "fuse_encoder_relu",
    "rewrite_decoder",
    "use_attention_kernel",
]


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
        scale_g = inv_std * self.weight.float().view(1, self.groups, -1)  # [N, groups, C/groups]
        scale = scale_g.view(n, c)
        shift = self.bias.float() - (mean_g * scale_g).view(n, c)
        out = x.float() * scale[:, :, None, None] + shift[:, :, None, None]
        return out.to(x.dtype)


class KernelAttention(nn.Module):
    """transformers' Sam3Attention with the unmasked case through ``sam3stream::attention``
    (a masked call goes through SDPA, as before)."""

    def __init__(self, attention: Any) -> None:
        super().__init__()
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.heads, self.head_dim = int(attention.num_attention_heads), int(attention.head_dim)
        self.scaling = float(attention.scaling)
        attention_kernel.config_for(self.head_dim)  # fails here, not mid-graph, on another size

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        batch, seq_q, seq_k = query.shape[0], query.shape[1], key.shape[1]

        def heads(x: torch.Tensor, tokens: int) -> torch.Tensor:
            return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(query), seq_q)
        k = heads(self.k_proj(key), seq_k)
        v = heads(self.v_proj(value), seq_k)
        if attention_mask is None:
            out: torch.Tensor = torch.ops.sam3stream.attention(q, k, v, self.scaling)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, scale=self.scaling
            ).transpose(1, 2)
        return self.o_proj(out.reshape(batch, seq_q, self.heads * self.head_dim)), None


def use_attention_kernel(detr_encoder: nn.Module) -> int:
    """Give every DETR encoder layer a :class:`KernelAttention` self-attention; returns the count."""
    count = 0
    for layer in getattr(detr_encoder, "layers", ()):
        if not isinstance(layer.self_attn, KernelAttention):
            layer.self_attn = KernelAttention(layer.self_attn)
            count += 1
    return count


def fuse_encoder_relu(detr_encoder: nn.Module) -> int:
    """Give every DETR encoder layer a ReLU :class:`FusedMLP`; returns the count."""
    return fuse_layer_mlps(getattr(detr_encoder, "layers", ()), "relu")


def rewrite_decoder(decoder: Any) -> int:
    """Swap in :class:`ChannelsLastGroupNorm` for the pixel decoder's GroupNorms of a
    :class:`~sam3stream.model.parts.Decoder`; returns the count."""
    norms = decoder.pixel_decoder.norms
    count = 0
    for index, norm in enumerate(norms):
        if isinstance(norm, nn.GroupNorm):
            norms[index] = ChannelsLastGroupNorm(norm)
            count += 1
    return count
