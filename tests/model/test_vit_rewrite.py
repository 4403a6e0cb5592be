"""The ViT rewrites of the torch backend: fused QKV is the same computation, FP8 stays close."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sam3stream.model.build import random_model
from sam3stream.model.parts import VisionEncoder
from sam3stream.runtime.vit_rewrite import (
    FP8_MAX,
    Fp8Linear,
    FusedQKVAttention,
    fuse_qkv,
    quantize_linears,
    quantize_rows,
)

R = 448


@pytest.fixture(scope="module")
def vision() -> VisionEncoder:
    return VisionEncoder(random_model("tiny", R, seed=0)).eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.randint(0, 256, (2, R, R, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def test_fused_qkv_gives_the_vision_encoder_the_same_outputs(
    vision: VisionEncoder, frames: torch.Tensor
) -> None:
    fused = copy.deepcopy(vision)
    layers = len(list(fused.backbone.layers))
    assert fuse_qkv(fused.backbone) == layers
    assert fuse_qkv(fused.backbone) == 0  # idempotent
    assert all(isinstance(layer.attention, FusedQKVAttention) for layer in fused.backbone.layers)
    with torch.no_grad():
        want, got = vision(frames), fused(frames)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_quantize_rows_puts_each_row_maximum_at_the_fp8_limit() -> None:
    rows = torch.randn(6, 64) * torch.logspace(-3, 3, 6).unsqueeze(1)  # six decades of magnitude
    rows[2] = 0.0
    q, scale = quantize_rows(rows)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    peak = q.float().abs().amax(dim=1)
    assert torch.equal(peak[[0, 1, 3, 4, 5]], torch.full((5,), FP8_MAX))
    assert peak[2] == 0.0  # an all-zero row stays zero, no NaN from a zero scale
    # e4m3 keeps 3 mantissa bits: dequantized values are within 1/16 relative of the input.
    back = q.float() * scale
    big = rows.abs() > rows.abs().amax(dim=1, keepdim=True) / 8
    assert ((back - rows).abs()[big] <= rows.abs()[big] / 16 + 1e-12).all()


def test_fp8_linear_is_close_to_the_float_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    fp8 = Fp8Linear(linear)
    x = torch.randn(4, 10, 128)
    with torch.no_grad():
        want, got = linear(x), fp8(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert _cosine(got, want) > 0.998
    zero = fp8(torch.zeros(1, 128)).float()
    torch.testing.assert_close(zero[0], linear.bias.detach().to(torch.bfloat16).float())


def test_quantized_vision_encoder_stays_close(vision: VisionEncoder, frames: torch.Tensor) -> None:
    quantized = copy.deepcopy(vision)
    fuse_qkv(quantized.backbone)
    layers = len(list(quantized.backbone.layers))
    assert quantize_linears(quantized.backbone) == 4 * layers  # qkv, o_proj, fc1, fc2
    assert not any(isinstance(m, nn.Linear) for m in quantized.backbone.layers.modules())
    with torch.no_grad():
        want, got = vision(frames), quantized(frames)
    for a, b in zip(want, got, strict=True):
        assert _cosine(a, b) > 0.99


def test_quantize_without_vit_layers_says_what_it_expected() -> None:
    with pytest.raises(TypeError, match="Sam3ViTModel"):
        quantize_linears(nn.Linear(4, 4))
