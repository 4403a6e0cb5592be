from __future__ import annotations

import numpy as np
import pytest

from sam3stream import rle
from sam3stream.stream.frames import Rle

try:  # only a cross-check; the hand-worked strings below stand on their own
    from pycocotools import mask as coco_mask  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError:
    coco_mask = None


# Strings worked out by hand from pycocotools' rleToString:
#   [1, 3]          -> '1' (49), '3' (51)
#   [5, 10, 20, 3]  -> 5 -> '5'; 10 -> ':' (58);
#                      20 = 0b10100 has the sign bit, so it continues: 0x14|0x20 -> 'd', then 0 -> '0';
#                      3 is stored as 3 - 10 = -7: low 5 bits 0b11001, rest -1 -> stop -> chr(25 + 48) = 'I'
#   [100]           -> 100 = 3*32 + 4: chunk 4|0x20 -> 'T', then 3 -> '3'
#   [0, 6]          -> '0', '6'
KNOWN = [
    ([1, 3], "13"),
    ([5, 10, 20, 3], "5:d0I"),
    ([100], "T3"),
    ([0, 6], "06"),
]


@pytest.mark.parametrize(("counts", "string"), KNOWN)
def test_known_strings(counts: list[int], string: str) -> None:
    assert rle.counts_to_string(counts) == string
    assert rle.counts_from_string(string).tolist() == counts


def test_hand_worked_mask() -> None:
    # Column-major: column 0 is (0, 1), column 1 is (1, 1) -> runs 1 zero, 3 ones.
    mask = np.array([[0, 1], [1, 1]], dtype=bool)
    assert rle.mask_counts(mask).tolist() == [1, 3]
    assert rle.encode(mask) == Rle(size=(2, 2), counts="13")
    # A mask starting with a 1 still starts with an (empty) zero run.
    full = np.ones((2, 3), dtype=bool)
    assert rle.encode(full) == Rle(size=(2, 3), counts="06")
    assert (rle.decode(Rle(size=(2, 2), counts="13")) == mask).all()


def test_round_trips_random_and_structured_masks() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        mask = rng.random((h, w)) < rng.random()
        assert (rle.decode(rle.encode(mask)) == mask).all()
    big = np.zeros((1080, 1920), dtype=bool)
    big[100:900, 300:1700] = True
    big[500:520, :] = False
    enc = rle.encode(big)
    assert (rle.decode(enc) == big).all()
    assert enc.size == (1080, 1920)


def naive_counts(mask: np.ndarray) -> list[int]:
    counts, current, run = [], False, 0
    for v in mask.ravel(order="F").tolist():
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return [*counts, run]


def test_counts_match_a_naive_column_major_scan() -> None:
    # Blobs take the sparse-edge path, speckle the dense one: both must agree with the definition.
    rng = np.random.default_rng(11)
    for i in range(120):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        if i % 2:
            mask = rng.random((h, w)) < 0.5
        else:
            mask = np.zeros((h, w), dtype=bool)
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            mask[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] = True
            mask[0, 0] = bool(i % 4)
        assert rle.mask_counts(mask).tolist() == naive_counts(mask)


def test_large_and_negative_deltas_round_trip() -> None:
    counts = [0, 2_000_000, 1, 3, 1_500_000, 1, 7, 0, 0, 5]
    assert rle.counts_from_string(rle.counts_to_string(counts)).tolist() == counts


def test_empty_and_bad_input() -> None:
    assert rle.encode(np.zeros((0, 4), dtype=bool)).counts == "0"
    assert rle.decode(rle.encode(np.zeros((3, 0), dtype=bool))).shape == (3, 0)
    with pytest.raises(ValueError, match="cover"):
        rle.decode(Rle(size=(2, 2), counts="14"))
    with pytest.raises(ValueError, match="truncated"):
        rle.counts_from_string("T")
    with pytest.raises(ValueError, match="outside"):
        rle.counts_from_string("1 3")


@pytest.mark.skipif(coco_mask is None, reason="pycocotools not installed")
def test_matches_pycocotools() -> None:
    assert coco_mask is not None
    rng = np.random.default_rng(3)
    for i in range(100):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        mask = rng.random((h, w)) < (0.05 if i % 2 else 0.6)
        if i % 3 == 0:
            mask = np.zeros((h, w), dtype=bool)
            mask[int(rng.integers(0, h)) :, int(rng.integers(0, w)) :] = True
        ref = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle.encode(mask).counts == ref["counts"].decode()
        assert (rle.decode(Rle(size=(h, w), counts=ref["counts"].decode())) == mask).all()
    for counts, string in KNOWN:
        n = sum(counts)
        ref = coco_mask.frPyObjects({"size": [1, n], "counts": counts}, 1, n)
        assert ref["counts"].decode() == string


def _rle_to_string(counts: list[int]) -> str:
    """pycocotools' rleToString, line by line (C's arithmetic shift is Python's >>)."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            chunk = x & 0x1F
            x >>= 5
            more = x != -1 if chunk & 0x10 else x != 0
            out.append(chr((chunk | (0x20 if more else 0)) + 48))
    return "".join(out)


def test_packing_matches_rle_to_string_line_by_line() -> None:
    """Runs of every magnitude, so that same-kind deltas of every chunk count and both signs occur
    (including the boundaries where one more chunk is needed)."""
    rng = np.random.default_rng(11)
    edges = [0, 15, 16, 511, 512, 16383, 16384, 2**19 - 1, 2**19, 2**24, 2**34, 2**44 + 3, 2**54]
    for trial in range(50):
        size = int(rng.integers(1, 400))
        scale = 10.0 ** rng.uniform(0, 17, size)
        counts = (rng.uniform(0, 1, size) * scale).astype(np.int64).tolist()
        if trial % 5 == 0:
            counts = [int(v) for v in rng.choice(edges, size)]
        assert rle.counts_to_string(counts) == _rle_to_string(counts), trial
        assert rle.counts_from_string(rle.counts_to_string(counts)).tolist() == counts
