"""Rewrites of the ViT backbone for the torch backend (same weights, fewer or cheaper GEMMs).

- :func:`fuse_qkv`: one [3D, D] projection per attention layer instead of three [D, D] ones.
  The same dot products in one larger GEMM (three launches and three reads of the input become
  one); numerically the same computation.
- :func:`quantize_linears`: the four GEMMs of every ViT layer (qkv, output projection, MLP fc1
  and fc2) in FP8 (e4m3) with row-wise scales: one scale per output channel for the weights,
  one per token for the activations, computed on the fly. Hopper and Ada tensor cores run FP8
  at twice the bf16 rate; the price is ~3 significant bits per operand, which the GPU parity
  test measures (tests/gpu). Opt-in: ``TorchOptions(vision_precision="fp8")``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP8_MAX", "Fp8Linear", "FusedQKVAttention", "fuse_qkv", "quantize_linears"]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_EPS = 1e-12  # a row of zeros gets a tiny scale instead of a division by zero


class FusedQKVAttention(nn.Module):
    """Sam3ViTRoPEAttention with its q, k and v projections concatenated into one."""

    def __init__(self, attention: Any) -> None:
        super().__init__()
        self.heads = int(attention.num_attention_heads)
        self.head_dim = int(attention.head_dim)
        self.scaling = float(attention.scaling)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        dim = attention.q_proj.in_features
        self.qkv = nn.Linear(dim, 3 * dim, device=attention.q_proj.weight.device)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([p.weight for p in projections], dim=0))
            self.qkv.bias.copy_(torch.cat([p.bias for p in projections], dim=0))
        self.qkv.to(attention.q_proj.weight.dtype)
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


def fuse_qkv(backbone: nn.Module) -> int:
    """Replace every ViT layer's attention with :class:`FusedQKVAttention`; returns the count."""
    count = 0
    for layer in _vit_layers(backbone):
        if not isinstance(layer.attention, FusedQKVAttention):
            layer.attention = FusedQKVAttention(layer.attention)
            count += 1
    return count


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with x and W in FP8 e4m3 and float32 row-wise scales, output in bf16."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / FP8_MAX  # [N, 1]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = out_dtype
        self.weight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("weight", (weight / scale).to(FP8))  # [N, K], row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, N]
        bias = None if linear.bias is None else linear.bias.detach().to(out_dtype).clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_q, x_scale = quantize_rows(rows)
        # _scaled_mm wants the second operand column-major: W^T of a row-major W is exactly that.
        out = torch._scaled_mm(
            x_q, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=self.out_dtype
        )
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (FP8 [M, K], float32 scales [M, 1]) with each row's largest magnitude at FP8_MAX."""
    scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=_EPS) / FP8_MAX
    return (rows.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_linears(backbone: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap each ViT layer's four GEMMs for :class:`Fp8Linear`; returns how many were swapped.

    Call after :func:`fuse_qkv`, on the float32 (or bf16) model, before moving it to the GPU."""
    count = 0
    for layer in _vit_layers(backbone):
        attention = (layer.attention, ("qkv", "q_proj", "k_proj", "v_proj", "o_proj"))
        for owner, names in (attention, (layer.mlp, ("fc1", "fc2"))):
            for name in names:
                linear = getattr(owner, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(owner, name, Fp8Linear(linear, out_dtype))
                    count += 1
    return count


def _vit_layers(backbone: nn.Module) -> list[Any]:
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise TypeError(f"expected a Sam3ViTModel with .layers, got {type(backbone).__name__}")
    return list(layers)
