"""Masks encoded by the device path (runtime/mask_encode.py, run here by torch on the CPU) carry
the runs the host's encoder makes from the same logits."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch

from sam3stream.postprocess import _mask_counts
from sam3stream.rle import counts_to_string, decode
from sam3stream.runtime import mask_encode
from sam3stream.runtime.mask_encode import encode_kept_masks
from sam3stream.stream.frames import Rle
from tests.test_postprocess import MASKS

SIZES = [(1920, 1080), (641, 359), (2000, 30), (100, 77), (288, 288)]


def host_counts(logits: npt.NDArray[np.float32], width: int, height: int) -> npt.NDArray[np.int64]:
    with np.errstate(invalid="ignore", over="ignore"):
        return _mask_counts(logits, width, height)


def pixels_differing(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], width: int, height: int) -> int:
    """How many pixels of the [height, width] masks that the runs ``a`` and ``b`` describe differ."""

    def pixels(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return decode(Rle(size=(height, width), counts=counts_to_string(counts)))

    return int(np.count_nonzero(pixels(a) != pixels(b)))


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_each_mask_has_the_host_encoders_runs(width: int, height: int) -> None:
    names = list(MASKS)
    masks = torch.zeros(1, 1, len(names), 288, 288)
    for k, name in enumerate(names):
        logits = torch.from_numpy(MASKS[name])
        masks[0, 0, k, : logits.shape[0], : logits.shape[1]] = logits
    index = torch.tensor([[0, 0, k] for k in range(len(names))])
    got = encode_kept_masks(masks, index, [(width, height)])
    assert len(got) == len(names)
    for k, name in enumerate(names):
        want = host_counts(masks[0, 0, k].numpy(), width, height)
        assert got[k].dtype == np.int64 and got[k].sum() == width * height, name
        if np.isfinite(MASKS[name]).all():
            np.testing.assert_array_equal(got[k], want, err_msg=name)
        else:  # inf x a zero weight: torch's kernels and ours may part on a pixel or two
            differ = pixels_differing(got[k], want, width, height)
            assert differ <= 8, (name, differ)


def test_groups_share_a_size_and_fit_the_budget() -> None:
    frames = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 0])
    sizes = [(10, 10), (10, 10), (5, 40)]
    assert mask_encode._groups(frames, sizes, budget=300) == [(0, 3), (3, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
    assert mask_encode._groups(frames, sizes, budget=10) == [(n, n + 1) for n in range(10)]
    assert mask_encode._groups(frames[:0], sizes, budget=10) == []


def test_frames_of_other_sizes_in_groups_under_the_budget() -> None:
    """Masks of 3 frames (two sizes), a few at a time under a small pixel budget: each mask still
    gets its own frame's size and its own runs, in index order."""
    rng = np.random.default_rng(7)
    masks = torch.from_numpy((rng.standard_normal((3, 2, 4, 24, 24)) * 3).astype(np.float32))
    keep = rng.uniform(size=(3, 2, 4)) > 0.3
    index = torch.from_numpy(np.argwhere(keep))
    sizes = [(64, 48), (64, 48), (50, 90)]
    got = encode_kept_masks(masks, index, sizes, budget=3 * 64 * 48)
    assert len(got) == len(index)
    for row, (b, c, k) in enumerate(index.tolist()):
        w, h = sizes[b]
        np.testing.assert_array_equal(got[row], host_counts(masks[b, c, k].numpy(), w, h))


def test_a_mask_larger_than_the_budget_is_still_encoded() -> None:
    masks = torch.from_numpy(MASKS["blobs"])[None, None, None]
    got = encode_kept_masks(masks, torch.zeros(1, 3, dtype=torch.long), [(300, 200)], budget=10)
    np.testing.assert_array_equal(got[0], host_counts(MASKS["blobs"], 300, 200))


def test_nothing_kept_is_nothing_encoded() -> None:
    assert encode_kept_masks(torch.zeros(1, 1, 2, 8, 8), torch.zeros(0, 3, dtype=torch.long), [(4, 4)]) == []


def test_bad_sizes_name_the_frame() -> None:
    masks = torch.zeros(2, 1, 1, 8, 8)
    index = torch.tensor([[1, 0, 0]])
    with pytest.raises(ValueError, match="frame 1, but 1 output sizes"):
        encode_kept_masks(masks, index, [(4, 4)])
    with pytest.raises(ValueError, match="0x4 for frame 1"):
        encode_kept_masks(masks, index, [(4, 4), (0, 4)])
