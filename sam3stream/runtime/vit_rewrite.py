"""Rewrites of the ViT backbone for the torch backend.

- :func:`fuse_qkv`: one [3D, D] projection per attention layer instead of three [D, D] ones. The
  same dot products in one larger GEMM (three launches and three reads of the input become one);
  numerically the same computation. Always applied.
- :func:`fuse_mlp_gelu`: the MLP's first GEMM with its GELU in the GEMM's epilogue
  (runtime/fused_mlp.py), so the [tokens, 4736] activation is written once. Whether it pays
  depends on the GEMM shape (on the H200 6% faster at 5184 tokens, equal at 4608, 16% slower at
  6400), so the backend times both on the layer's own weights when it starts.

(FP8 GEMMs with row-wise scales were measured here too and dropped: slower at these shapes once
the activations are quantized on the fly, and masks off the float32 reference; docs/bench.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sam3stream.runtime.fused_mlp import fuse_layer_mlps

__all__ = ["FusedQKVAttention", "fuse_mlp_gelu", "fuse_qkv"]


class FusedQKVAttention(nn.Module):
    """Sam3ViTRoPEAttention with its q, k and v projections concatenated into one."""

    def __init__(self, attention: Any) -> None:
        super().__init__()
        self.heads = int(attention.num_attention_heads)
        self.head_dim = int(attention.head_dim)
        self.scaling = float(attention.scaling)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        dim, like = attention.q_proj.in_features, attention.q_proj.weight
        self.qkv = nn.Linear(dim, 3 * dim, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([p.weight for p in projections], dim=0))
            self.qkv.bias.copy_(torch.cat([p.bias for p in projections], dim=0))
        self.o_proj = attention.o_proj

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,  # transformers passes attention kwargs; none apply here
    ) -> tuple[torch.Tensor, None]:
        from transformers.models.sam3.modeling_sam3 import apply_rotary_pos_emb_2d

        batch, height, width, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, height * width, 3, self.heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in qkv.unbind(2))
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb_2d(query, key, cos=cos, sin=sin)
        out = F.scaled_dot_product_attention(query, key, value, scale=self.scaling)
        out = out.transpose(1, 2).reshape(batch, height, width, -1)
        return self.o_proj(out), None


def fuse_mlp_gelu(backbone: nn.Module) -> int:
    """Replace every ViT layer's MLP with a GELU :class:`FusedMLP`; returns the count."""
    return fuse_layer_mlps(_vit_layers(backbone), "gelu")


def fuse_qkv(backbone: nn.Module) -> int:
    """Replace every ViT layer's attention with :class:`FusedQKVAttention`; returns the count."""
    count = 0
    for layer in _vit_layers(backbone):
        if not isinstance(layer.attention, FusedQKVAttention):
            layer.attention = FusedQKVAttention(layer.attention)
            count += 1
    return count


def _vit_layers(backbone: nn.Module) -> list[Any]:
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise TypeError(f"expected a Sam3ViTModel with .layers, got {type(backbone).__name__}")
    return list(layers)
