"""Rewrites of the ViT backbone for the torch backend.

- :func:`fuse_qkv`: one [3D, D] projection per attention layer instead of three [D, D] ones. The
  same dot products in one larger GEMM (three launches and three reads of the input become one);
  numerically the same computation. Always applied.
- :func:`fuse_mlp_gelu`: the MLP's first GEMM with its GELU in the GEMM's epilogue (cuBLASLt), so
  the [tokens, 4736] activation is written once instead of written, read and written again.
  cuBLASLt's epilogue is the tanh form of GELU (|difference| < 5e-4, well below bf16's rounding
  of the same values). Whether it pays depends on the GEMM shape (cuBLASLt picks other kernels
  than cuBLAS: on the H200 6% faster at 5184 tokens, equal at 4608, 16% slower at 6400), so
  :func:`fused_gelu_pays` times both on the layer's own weights when the backend starts.

(FP8 GEMMs with row-wise scales were measured here too and dropped: slower at these shapes once
the activations are quantized on the fly, and masks off the float32 reference; docs/bench.)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from sam3stream.runtime.cuda_timing import median_cuda_ms

__all__ = [
    "FusedGeluMLP",
    "FusedQKVAttention",
    "fuse_mlp_gelu",
    "fuse_qkv",
    "fused_gelu_pays",
    "linear_gelu",
]


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


@torch.library.custom_op("sam3stream::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) in one cuBLASLt call on CUDA (an opaque op, so that
    torch.compile keeps the epilogue instead of decomposing it into a GEMM and a GELU kernel)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _linear_gelu_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@register_flop_formula(torch.ops.sam3stream.linear_gelu)
def _linear_gelu_flops(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
    tokens = 1
    for size in x_shape[:-1]:
        tokens *= size
    return 2 * tokens * int(x_shape[-1]) * int(w_shape[0])


class FusedGeluMLP(nn.Module):
    """Sam3MLP (fc1, GELU, fc2) with fc1 and the GELU in one GEMM."""

    def __init__(self, mlp: Any) -> None:
        super().__init__()
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.fc2(linear_gelu(hidden_states, self.fc1.weight, self.fc1.bias))
        return hidden


def fuse_mlp_gelu(backbone: nn.Module) -> int:
    """Replace every ViT layer's MLP with :class:`FusedGeluMLP`; returns the count."""
    count = 0
    for layer in _vit_layers(backbone):
        if isinstance(layer.mlp, FusedGeluMLP):
            continue
        act = getattr(layer.mlp, "activation_fn", None)
        if "GELU" not in type(act).__name__:
            raise TypeError(f"expected a GELU MLP in the ViT, got {type(act).__name__}")
        layer.mlp = FusedGeluMLP(layer.mlp)
        count += 1
    return count


def fused_gelu_pays(backbone: nn.Module, tokens: int, repeats: int = 20) -> tuple[bool, float, float]:
    """Time one ViT layer's MLP as it is and with the fused GELU on ``tokens`` tokens (CUDA).

    Returns (fused is faster, median ms as is, median ms fused)."""
    mlp = _vit_layers(backbone)[0].mlp
    like = mlp.fc1.weight
    x = torch.randn(tokens, like.shape[1], device=like.device, dtype=like.dtype)
    fused = FusedGeluMLP(mlp)
    with torch.no_grad():
        plain_ms, fused_ms = (median_cuda_ms(partial(fn, x), repeats) for fn in (mlp, fused))
    return fused_ms < plain_ms, plain_ms, fused_ms


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
