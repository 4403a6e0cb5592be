"""Position tables computed once give the parts exactly what computing them per call gives."""

from __future__ import annotations

import copy

import pytest
import torch

from sam3stream.model.build import random_model
from sam3stream.model.parts import Parts, padding_boxes, split_model
from sam3stream.runtime.precomputed import PrecomputedPositions, PrecomputedRotary, precompute_rotary

R = 448
GRID = R // 14


@pytest.fixture(scope="module")
def parts() -> Parts:
    return split_model(random_model("tiny", R, seed=0), 20)


def test_vision_encoder_is_unchanged_with_precomputed_rotary(parts: Parts) -> None:
    frames = torch.randint(
        0, 256, (2, R, R, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    vision = copy.deepcopy(parts.vision)
    layers = len(list(vision.backbone.layers))
    assert precompute_rotary(vision.backbone) == layers
    assert precompute_rotary(vision.backbone) == 0  # idempotent
    assert all(isinstance(layer.rotary_emb, PrecomputedRotary) for layer in vision.backbone.layers)
    with torch.no_grad():
        want, got = parts.vision(frames), vision(frames)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_decoder_and_geometry_are_unchanged_with_precomputed_positions(parts: Parts) -> None:
    torch.manual_seed(0)
    d = parts.decoder.detr_encoder.config.hidden_size
    fpn0, fpn1, fpn2 = (torch.randn(2, d, GRID * s, GRID * s) for s in (4, 2, 1))
    text, text_mask = torch.randn(3, 32, d), torch.ones(3, 32, dtype=torch.bool)
    decoder, geometry = copy.deepcopy(parts.decoder), copy.deepcopy(parts.geometry)
    positions = PrecomputedPositions(decoder.position_encoding, GRID, torch.device("cpu"), torch.float32)
    decoder.position_encoding = geometry.position_encoding = positions
    with torch.no_grad():
        want_geo = parts.geometry(fpn2, *padding_boxes(2))
        got_geo = geometry(fpn2, *padding_boxes(2))
        want = parts.decoder(fpn0, fpn1, fpn2, text, text_mask, *want_geo)
        got = decoder(fpn0, fpn1, fpn2, text, text_mask, *got_geo)
    for a, b in zip((*want_geo, *want), (*got_geo, *got), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_other_shapes_and_dtypes_are_computed_as_before(parts: Parts) -> None:
    encoding = parts.decoder.position_encoding
    positions = PrecomputedPositions(encoding, GRID, torch.device("cpu"), torch.float32)
    other = torch.Size((2, 8, GRID + 2, GRID))
    torch.testing.assert_close(positions(other, "cpu", torch.float32), encoding(other, "cpu", torch.float32))
    same = torch.Size((3, 8, GRID, GRID))
    half = positions(same, "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, encoding(same, "cpu", torch.bfloat16))
    assert positions(same, "cpu", torch.float32).shape[0] == 3
