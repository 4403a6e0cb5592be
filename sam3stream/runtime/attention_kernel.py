"""A Triton flash-attention forward kernel for SAM 3's unmasked self-attention (bf16, CUDA).

Why our own: the DETR encoder's self-attention has 8 heads of 32 over all image tokens (5184 at
1008). At head dim 32 there is one exponential per 64 multiply-adds, so the softmax, not the
tensor cores, bounds it; cuDNN and FlashAttention-2 both ran it at ~190 TFLOP/s on the H200, the
largest single cost of the decoder (docs/bench). With tiles chosen for that shape (64 x 64)
this kernel runs it 1.38x faster than cuDNN on the H200.

Two numeric options are compile-time switches so that tools/attention_bench.py can time them;
both are off in the measured defaults, because neither paid on the H200:

- ``fast_exp``: the exponentials in half precision, two per instruction (``ex2.approx.f16x2``);
  converting the scores to fp16 cost more than the paired instructions saved.
- ``sum_by_dot``: the softmax's row sums from the second matmul, by a column of ones appended
  to V; doubling that matmul's width cost more than the reductions it replaced.

Inputs are [batch, heads, tokens, dim] views with any strides whose last one is 1 (the
projections' ``view(...).transpose(1, 2)`` needs no copy); the output is [batch, tokens, heads,
dim], contiguous, so that the output projection reads it as [batch, tokens, heads * dim].

``attention`` is registered as the torch operator ``sam3stream::attention`` so that a compiled
graph calls the kernel as one opaque step (and a CUDA graph captures its launch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = [
    "KernelConfig",
    "attention",
    "attention_reference",
    "available",
    "config_for",
    "kernel_pays",
    "supports",
]


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape, launch and numeric options of one kernel instance."""

    block_m: int = 128
    block_n: int = 64
    warps: int = 4
    stages: int = 3
    fast_exp: bool = False
    sum_by_dot: bool = False


# The fastest per head dim in tools/attention_bench.py --triton on the H200 at 1008
# (docs/bench/attention_kernel_1008.json): the DETR encoder's shape for 32, the ViT's global
# layers for 64. Neither liberty paid there: converting the scores to half precision cost what
# the paired exponentials saved, and the ones column doubled the second matmul.
_CONFIGS: dict[int, KernelConfig] = {
    32: KernelConfig(block_m=64, block_n=64, warps=4, stages=4, fast_exp=False),
    64: KernelConfig(block_m=128, block_n=64, warps=8, stages=3, fast_exp=False),
}


def supports(head_dim: int) -> bool:
    return head_dim in _CONFIGS


def config_for(head_dim: int) -> KernelConfig:
    """The measured default configuration for ``head_dim``."""
    if head_dim not in _CONFIGS:
        raise ValueError(f"attention kernel: head dim {head_dim} is not supported (32 or 64)")
    return _CONFIGS[head_dim]


@cache
def available() -> bool:
    """Whether the kernel can run here: Triton importable and a CUDA device present."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: KernelConfig | None = None
) -> torch.Tensor:
    """Run the kernel on [B, H, N, D] inputs; returns [B, N, H, D] (see the module docstring)."""
    batch, heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    if k.shape != (batch, heads, seq_k, dim) or v.shape != k.shape:
        raise ValueError(f"attention kernel: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    cfg = config or config_for(dim)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(batch, seq_q, heads, dim, device=q.device, dtype=q.dtype)
    grid = (-(-seq_q // cfg.block_m), batch * heads)
    width = 2 * dim if cfg.sum_by_dot else dim
    from sam3stream.runtime.attention_triton import attention_fwd

    attention_fwd[grid](
        q, k, v, out, scale * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        heads, seq_q,
        SEQ_K=seq_k, HEAD_DIM=dim, WIDTH=width, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        EVEN_N=seq_k % cfg.block_n == 0, FAST_EXP=cfg.fast_exp, SUM_BY_DOT=cfg.sum_by_dot,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("sam3stream::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for [B, H, N, D] inputs, as [B, N, H, D] (the default config)."""
    return launch(q, k, v, scale)


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, seq_q, dim = q.shape
    return q.new_empty(batch, seq_q, heads, dim)


@register_flop_formula(torch.ops.sam3stream.attention)
def _attention_flops(q_shape: Any, k_shape: Any, *args: Any, **kwargs: Any) -> int:
    """Two matmuls, as PyTorch counts SDPA, so that FLOP utilisation is the same either way."""
    batch, heads, seq_q, dim = q_shape
    return int(4 * batch * heads * seq_q * k_shape[2] * dim)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The same contract through PyTorch's SDPA: what the kernel must match."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).contiguous()


def kernel_pays(
    batch: int,
    heads: int,
    tokens: int,
    dim: int,
    dtype: torch.dtype,
    rounds: int = 5,
    repeats: int = 10,
    stream: Any = None,
) -> tuple[bool, float, float]:
    """Time PyTorch's SDPA and the kernel on random inputs of this shape (CUDA), alternating the
    two (cuda_timing.best_alternating_ms), each captured in a CUDA graph as the backend runs
    them (on ``stream``, see cuda_timing.cuda_graphed). Returns (the kernel is faster, SDPA ms,
    kernel ms)."""
    from sam3stream.runtime.cuda_timing import best_alternating_ms, cuda_graphed

    q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", dtype=dtype) for _ in range(3))
    scale = dim**-0.5
    forms = [cuda_graphed(partial(form, q, k, v, scale), stream) for form in (attention_reference, launch)]
    sdpa_ms, kernel_ms = best_alternating_ms(forms, rounds, repeats)
    return kernel_ms < sdpa_ms, sdpa_ms, kernel_ms
