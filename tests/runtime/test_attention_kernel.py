"""The Triton attention kernel (runtime/attention_kernel.py) computes softmax(q k^T s) v.

Run in Triton's interpreter on machines without CUDA (float32: the interpreter has no bf16, and the fast
half-precision exponentials are PTX, so those run in tests/gpu only). Skipped without Triton.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from sam3stream.runtime.attention_kernel import (
    KernelConfig,
    attention_reference,
    config_for,
    launch,
)
from sam3stream.runtime.decoder_rewrite import KernelAttention

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "runs in Triton's interpreter, set up on machines without CUDA (tests/conftest.py); "
        "tests/gpu covers the compiled kernel",
        allow_module_level=True,
    )


def _qkv(batch: int, heads: int, tokens: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Scaled up so that the softmax is peaked and a wrong running maximum would show.
    return [torch.randn(batch, heads, tokens, dim, generator=gen) * 3 for _ in range(3)]


# 100 tokens: the last key tile is partial (masked); 128: every tile full.
@pytest.mark.parametrize("tokens", [100, 128])
@pytest.mark.parametrize("dim", [32, 64])
@pytest.mark.parametrize("sum_by_dot", [False, True])
def test_kernel_matches_sdpa(tokens: int, dim: int, sum_by_dot: bool) -> None:
    q, k, v = _qkv(2, 3, tokens, dim)
    cfg = KernelConfig(block_m=64, block_n=32, fast_exp=False, sum_by_dot=sum_by_dot)
    got = launch(q, k, v, dim**-0.5, cfg)
    assert got.shape == (2, tokens, 3, dim) and got.is_contiguous()
    torch.testing.assert_close(got, attention_reference(q, k, v, dim**-0.5), atol=2e-5, rtol=1e-5)


def test_kernel_reads_strided_views_and_other_key_lengths() -> None:
    # The projections' view(...).transpose(1, 2): [B, H, N, D] with N strided by H * D.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 40, 2, 32, generator=gen).transpose(1, 2)
    k, v = (torch.randn(2, 70, 2, 32, generator=gen).transpose(1, 2) for _ in range(2))
    cfg = replace(config_for(32), fast_exp=False)
    got = launch(q, k, v, 0.2, cfg)
    torch.testing.assert_close(got, attention_reference(q, k, v, 0.2), atol=2e-5, rtol=1e-5)


def test_kernel_refuses_mismatched_shapes_and_other_head_dims() -> None:
    q, k, v = _qkv(1, 2, 16, 32)
    with pytest.raises(ValueError, match="attention kernel"):
        launch(q, k[:, :1], v, 1.0)
    with pytest.raises(ValueError, match="head dim 16"):
        config_for(16)


def test_kernel_attention_module_matches_transformers_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.sam3.configuration_sam3 import Sam3DETREncoderConfig
    from transformers.models.sam3.modeling_sam3 import Sam3Attention

    from sam3stream.runtime import attention_kernel

    # The interpreter cannot run the measured default's PTX exponentials.
    monkeypatch.setitem(attention_kernel._CONFIGS, 32, replace(config_for(32), fast_exp=False))
    config = Sam3DETREncoderConfig(hidden_size=64, num_attention_heads=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(2)
    reference = Sam3Attention(config).eval()
    module = KernelAttention(reference)
    x, pos = torch.randn(3, 90, 64), torch.randn(3, 90, 64)
    mask = torch.randn(3, 1, 90, 90)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):  # unmasked: the kernel; masked: SDPA
            want, _ = reference(query=x + pos, key=x + pos, value=x, **kwargs)
            got, weights = module(query=x + pos, key=x + pos, value=x, **kwargs)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            assert weights is None


def test_flop_count_is_what_pytorch_counts_for_sdpa() -> None:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    q, k, v = _qkv(2, 4, 64, 32)
    with FlopCounterMode(display=False) as counter:
        torch.ops.sam3stream.attention(q, k, v, 0.5)
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, k.shape, v.shape) > 0
