"""The torch backend's decoder rewrites (GroupNorm from channel moments, ReLU in the encoder MLP's
GEMM) compute what transformers' modules compute."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sam3stream.model.checkpoint import load_checkpoint
from sam3stream.model.parts import padding_boxes, split_model
from sam3stream.runtime.decoder_rewrite import (
    ChannelsLastGroupNorm,
    fuse_encoder_relu,
    rewrite_decoder,
    use_attention_kernel,
)
from sam3stream.runtime.fused_mlp import FusedMLP

R, B, K = 448, 2, 20


def _map(channels_last: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    # Channel offsets and scales that differ, so group statistics mix unlike channels.
    offset = torch.randn(1, 64, 1, 1, generator=gen) * 3
    scale = torch.rand(1, 64, 1, 1, generator=gen) * 2 + 0.1
    x = (torch.randn(3, 64, 20, 24, generator=gen) * scale + offset).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("channels_last", [True, False])
def test_group_norm_from_channel_moments_matches_group_norm(channels_last: bool) -> None:
    norm = torch.nn.GroupNorm(8, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = _map(channels_last)
    with torch.no_grad():
        want, got = norm(x), ChannelsLastGroupNorm(norm)(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_group_norm_keeps_bf16_and_matches_float32_statistics() -> None:
    norm = torch.nn.GroupNorm(8, 64)
    x = _map(True, torch.bfloat16)
    with torch.no_grad():
        want = norm(x.float())
        got = ChannelsLastGroupNorm(norm.to(torch.bfloat16))(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)  # bf16 output rounding


def test_group_norm_refuses_one_without_affine_parameters() -> None:
    with pytest.raises(TypeError, match="affine"):
        ChannelsLastGroupNorm(torch.nn.GroupNorm(4, 16, affine=False))


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> torch.nn.Module:
    return load_checkpoint(tiny_checkpoint, R).model


def test_fused_relu_refuses_a_gelu_mlp(model: torch.nn.Module) -> None:
    with pytest.raises(TypeError, match="expected a ReLU MLP, got GELU"):
        FusedMLP(model.vision_encoder.backbone.layers[0].mlp, "relu")


def test_attention_kernel_refuses_a_head_dim_it_has_no_tiles_for(model: torch.nn.Module) -> None:
    # The tiny model's DETR encoder has 4 heads of 8; the kernel is tuned for 32 and 64.
    with pytest.raises(ValueError, match="head dim 8 is not supported"):
        use_attention_kernel(split_model(model, K).decoder.detr_encoder)


def test_rewritten_decoder_gives_the_same_outputs(model: torch.nn.Module) -> None:
    parts = split_model(model, K)
    rewritten = copy.deepcopy(parts.decoder)
    assert rewrite_decoder(rewritten) == len(rewritten.pixel_decoder.norms)
    assert rewrite_decoder(rewritten) == 0  # idempotent
    layers = len(rewritten.detr_encoder.layers)
    assert fuse_encoder_relu(rewritten.detr_encoder) == layers
    assert fuse_encoder_relu(rewritten.detr_encoder) == 0
    gen = torch.Generator().manual_seed(5)
    frames = torch.randint(0, 256, (B, R, R, 3), dtype=torch.uint8, generator=gen)
    ids = torch.randint(0, 49406, (3, 32), generator=gen)
    mask = torch.zeros(3, 32, dtype=torch.long)
    mask[:, :6] = 1
    with torch.no_grad():
        fpn = parts.vision(frames)
        text = parts.text(ids, mask)
        geo, geo_mask = parts.geometry(fpn[2], *padding_boxes(B))
        inputs = (*fpn, text, mask.bool(), geo, geo_mask)
        want, got = parts.decoder(*inputs), rewritten(*inputs)
    for name, a, b in zip(("scores", "boxes", "masks", "presence", "index"), want, got, strict=True):
        if name == "index":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def test_group_norm_rewrite_compiles() -> None:
    # Inductor traces it (on the CPU here; the torch backend compiles it for CUDA).
    norm = ChannelsLastGroupNorm(torch.nn.GroupNorm(8, 64))
    x = _map(True)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(norm)(x), norm(x), atol=1e-5, rtol=1e-5)
