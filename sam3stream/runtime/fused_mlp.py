"""An MLP's first GEMM with its activation in the GEMM's epilogue (cuBLASLt), for the torch backend.

Used for the ViT's GELU MLPs (runtime/vit_rewrite.py) and the DETR encoder's ReLU MLPs
(runtime/decoder_rewrite.py): the [tokens, hidden] activation is written once instead of
written, read and written again. cuBLASLt's GELU epilogue is the tanh form (|difference| < 5e-4,
below bf16's rounding of the same values); its ReLU is exact. Whether the epilogue pays depends
on the GEMM shape, because cuBLASLt picks other kernels than cuBLAS: :func:`fused_mlp_pays`
times both forms on the layer's own weights, and the backend keeps the faster.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from sam3stream.runtime.cuda_timing import best_alternating_ms, cuda_graphed

__all__ = ["ACTIVATIONS", "FusedMLP", "fuse_layer_mlps", "fused_mlp_pays", "linear_gelu", "linear_relu"]

# Activation name -> the class name transformers' ACT2FN gives that activation.
ACTIVATIONS = {"gelu": "GELU", "relu": "ReLU"}


@torch.library.custom_op("sam3stream::linear_activation", mutates_args=())
def _linear_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(x @ weight.T + bias) in one cuBLASLt call on CUDA (an opaque op, so that torch.compile
    keeps the epilogue instead of decomposing it into a GEMM and an activation kernel)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=gelu)
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_activation.register_fake
def _linear_activation_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@register_flop_formula(torch.ops.sam3stream.linear_activation)
def _linear_activation_flops(x_shape: Any, w_shape: Any, *args: Any, **kwargs: Any) -> int:
    tokens = 1
    for size in x_shape[:-1]:
        tokens *= size
    return 2 * tokens * int(x_shape[-1]) * int(w_shape[0])


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.ops.sam3stream.linear_activation(x, weight, bias, True)
    return out


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.ops.sam3stream.linear_activation(x, weight, bias, False)
    return out


class FusedMLP(nn.Module):
    """Sam3MLP (fc1, activation, fc2) with fc1 and its activation in one GEMM."""

    def __init__(self, mlp: Any, activation: str) -> None:
        super().__init__()
        expected = ACTIVATIONS[activation]
        found = type(getattr(mlp, "activation_fn", None)).__name__
        if expected not in found:
            raise TypeError(f"expected a {expected} MLP, got {found}")
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2
        self._first = linear_gelu if activation == "gelu" else linear_relu

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.fc2(self._first(hidden_states, self.fc1.weight, self.fc1.bias))
        return hidden


def fuse_layer_mlps(layers: Iterable[Any], activation: str) -> int:
    """Give every layer (with an ``mlp``) an ``activation`` :class:`FusedMLP`; returns how many
    were replaced (0 when all already were)."""
    count = 0
    for layer in layers:
        if not isinstance(layer.mlp, FusedMLP):
            layer.mlp = FusedMLP(layer.mlp, activation)
            count += 1
    return count


def fused_mlp_pays(
    mlp: Any, activation: str, tokens: int, rounds: int = 5, repeats: int = 10, stream: Any = None
) -> tuple[bool, float, float]:
    """Time ``mlp`` as it is and fused on ``tokens`` tokens (CUDA), each captured in a CUDA graph
    as the backend runs them, alternating the two for ``rounds`` rounds so that clocks still
    ramping up at start favour neither; each form's time is its best round's median. ``stream``:
    where to capture (cuda_timing.cuda_graphed).

    Returns (fused is faster, ms as is, ms fused)."""
    like = mlp.fc1.weight
    x = torch.randn(tokens, like.shape[1], device=like.device, dtype=like.dtype)
    with torch.no_grad():
        forms = [cuda_graphed(partial(form, x), stream) for form in (mlp, FusedMLP(mlp, activation))]
        plain_ms, fused_ms = best_alternating_ms(forms, rounds, repeats)
    return fused_ms < plain_ms, plain_ms, fused_ms
