"""The torch backend's ViT rewrites (fused QKV projection, GELU in the GEMM epilogue) compute what
transformers' layers compute."""

from __future__ import annotations

import copy

import pytest
import torch

from sam3stream.model.build import random_model
from sam3stream.model.parts import VisionEncoder
from sam3stream.runtime.fused_mlp import FusedMLP, linear_gelu
from sam3stream.runtime.vit_rewrite import FusedQKVAttention, fuse_mlp_gelu, fuse_qkv

R = 448


@pytest.fixture(scope="module")
def vision() -> VisionEncoder:
    return VisionEncoder(random_model("tiny", R, seed=0)).eval()


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return torch.randint(0, 256, (2, R, R, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


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


def test_fuse_qkv_names_what_it_expected() -> None:
    with pytest.raises(TypeError, match=r"expected a Sam3ViTModel with \.layers, got Linear"):
        fuse_qkv(torch.nn.Linear(4, 4))


def test_fused_gelu_mlp_gives_the_vision_encoder_the_same_outputs(
    vision: VisionEncoder, frames: torch.Tensor
) -> None:
    # On the CPU the fused op computes exact GELU, so the outputs must match; on CUDA cuBLASLt's
    # epilogue uses the tanh form (checked against the float32 reference in tests/gpu).
    fused = copy.deepcopy(vision)
    fuse_qkv(fused.backbone)
    layers = len(list(fused.backbone.layers))
    assert fuse_mlp_gelu(fused.backbone) == layers
    assert fuse_mlp_gelu(fused.backbone) == 0  # idempotent
    with torch.no_grad():
        want, got = vision(frames), fused(frames)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_linear_gelu_compiles_as_one_op_with_the_right_shape() -> None:
    x, w, b = torch.randn(2, 3, 8), torch.randn(16, 8), torch.randn(16)
    want = torch.nn.functional.gelu(x @ w.T + b)
    got = torch.compile(lambda t: linear_gelu(t, w, b), dynamic=False)(x)
    assert got.shape == (2, 3, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fuse_mlp_gelu_refuses_an_mlp_without_gelu(vision: VisionEncoder) -> None:
    other = copy.deepcopy(vision)
    other.backbone.layers[0].mlp.activation_fn = torch.nn.ReLU()
    with pytest.raises(TypeError, match="expected a GELU MLP, got ReLU"):
        fuse_mlp_gelu(other.backbone)


def test_flop_counter_counts_the_fused_gemm_like_the_plain_one(vision: VisionEncoder) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    mlp = vision.backbone.layers[0].mlp
    x = torch.randn(2, 7, mlp.fc1.in_features)
    counts = []
    for module in (mlp, FusedMLP(mlp, "gelu")):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
