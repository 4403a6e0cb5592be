"""The torch backend's fused QKV projection is the same computation as transformers' three."""

from __future__ import annotations

import copy

import pytest
import torch

from sam3stream.model.build import random_model
from sam3stream.model.parts import VisionEncoder
from sam3stream.runtime.vit_rewrite import FusedQKVAttention, fuse_qkv

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
