"""Position tables computed once, for the torch backend's fixed shapes.

transformers builds the ViT's RoPE cos/sin and the DETR's sine position encoding from ``arange``
on every call. Under torch.compile these are cheap to trace but inductor inlines them into their
consumers, so every element of q, k and of the encoder's inputs recomputes sin and cos (on the
H200 at 1008: the RoPE kernels took 38.7 us per window layer and frame, the DETR encoder's
layer-norm kernels 100-200 us). A table read back is a plain load.

The tables are computed by the same modules, eagerly, in the dtype the model asks for, so the
values are the ones an eager run would use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PrecomputedPositions", "PrecomputedRotary", "precompute_rotary"]


class PrecomputedRotary(nn.Module):
    """A ViT layer's rotary embedding for its fixed ``position_ids``: (cos, sin), float32."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, rotary: nn.Module, position_ids: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            cos, sin = rotary(position_ids, position_ids)  # the first argument only gives the device
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin


def precompute_rotary(backbone: nn.Module) -> int:
    """Give every ViT layer a :class:`PrecomputedRotary`; returns the count."""
    count = 0
    for layer in getattr(backbone, "layers", ()):
        if not isinstance(layer.rotary_emb, PrecomputedRotary):
            layer.rotary_emb = PrecomputedRotary(layer.rotary_emb, layer.position_ids)
            count += 1
    return count


class PrecomputedPositions(nn.Module):
    """Sam3SinePositionEmbedding with its table for one grid size kept; other shapes (or a mask)
    are computed as before."""

    table: torch.Tensor

    def __init__(self, encoding: Any, grid: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoding = encoding
        self.grid = grid
        with torch.no_grad():
            table = encoding(torch.Size((1, 1, grid, grid)), device, dtype)
        self.register_buffer("table", table, persistent=False)

    def forward(
        self,
        shape: torch.Size,
        device: torch.device | str,
        dtype: torch.dtype,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        table = self.table
        if mask is None and tuple(shape[-2:]) == (self.grid, self.grid) and dtype == table.dtype:
            return table.expand(shape[0], -1, -1, -1)
        out: torch.Tensor = self.encoding(shape, device, dtype, mask)
        return out
