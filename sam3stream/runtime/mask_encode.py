"""Kept masks resized, thresholded and run-length encoded on the device.

The host's encoder (postprocess.py) costs milliseconds per mask at full HD and shares Python's
lock, so past a few hundred masks a second the host, not the GPU, sets a pipeline's pace. On
the device the same work is a bilinear resize, a comparison and one ``nonzero`` per group of
masks; only the positions where each mask changes value (column-major, COCO's order) cross to
the host, which turns them into run lengths.

The resize is ``F.interpolate(bilinear, align_corners=False)`` on float32 logits, as the host's
encoder computes it; the two agree except for pixels whose value rounds to within a few float32
ulps of the threshold (tests compare them mask by mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from sam3stream.rle import counts_from_edges

__all__ = ["PIXEL_BUDGET", "encode_kept_masks", "encode_masks", "kept_rows"]

# Output pixels resized at once: float32 values, the mask, its column-major copy and where it
# changes, up to ~7 bytes a pixel, so 8 Mi pixels (four full-HD masks) hold ~40-60 MiB for a
# moment (the process held 80-100 MiB more at 1008 x 8 on the H200 with it, docs/bench).
PIXEL_BUDGET = 8 * 1024 * 1024

Counts = npt.NDArray[np.int64]


def _groups(
    frames: npt.NDArray[np.int64], sizes: Sequence[tuple[int, int]], budget: int
) -> list[tuple[int, int]]:
    """[start, stop) row ranges of kept masks that share an output size and fit the budget
    together (at least one row each). Raises on a frame without a (positive) size."""
    for f in np.unique(frames):
        if not 0 <= f < len(sizes):
            raise ValueError(f"a kept mask of frame {f}, but {len(sizes)} output sizes")
        w, h = sizes[int(f)]
        if w <= 0 or h <= 0:
            raise ValueError(f"output size must be positive, got {w}x{h} for frame {f}")
    groups: list[tuple[int, int]] = []
    start, count = 0, int(frames.size)
    while start < count:
        w, h = sizes[int(frames[start])]
        per = max(1, budget // (w * h))
        stop = start + 1
        while stop < count and stop - start < per and sizes[int(frames[stop])] == (w, h):
            stop += 1
        groups.append((start, stop))
        start = stop
    return groups


def kept_rows(masks: Any, index: Any) -> Any:
    """The rows of ``masks`` [B, C, K, ...] at ``index`` [N, 3] (frame, class, query): [N, ...]."""
    return masks[index[:, 0], index[:, 1], index[:, 2]]


def encode_kept_masks(
    masks: Any,
    index: Any,
    sizes: Sequence[tuple[int, int]],
    budget: int = PIXEL_BUDGET,
) -> list[Counts]:
    """COCO run lengths of the kept masks, each at its frame's output size.

    ``masks`` [B, C, K, M, M] logits on the device; ``index`` [N, 3] (frame, class, query) of
    the kept rows, a device tensor; ``sizes[b]`` = (width, height) of frame b's masks.
    Returns one uncompressed counts array per kept row, in ``index`` order. Rows are gathered a
    budget's worth at a time, so the device never holds all N masks' logits at once.
    """
    frames = index[:, 0].cpu().numpy().astype(np.int64)
    counts: list[Counts] = []
    for start, stop in _groups(frames, sizes, budget):
        counts += encode_masks(kept_rows(masks, index[start:stop]), frames[start:stop], sizes, budget)
    return counts


def encode_masks(
    logits: Any,
    frames: npt.NDArray[np.int64],
    sizes: Sequence[tuple[int, int]],
    budget: int = PIXEL_BUDGET,
) -> list[Counts]:
    """COCO run lengths of ``logits`` [N, M, M] (a device tensor), row n at the output size of
    frame ``frames[n]``: ``sizes[b]`` = (width, height). One array per row, in order."""
    import torch
    import torch.nn.functional as F

    counts: list[Counts] = []
    with torch.no_grad():
        for start, stop in _groups(frames, sizes, budget):
            w, h = sizes[int(frames[start])]
            x = logits[start:stop].float()[:, None]
            on = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0
            flat = on.transpose(1, 2).reshape(stop - start, h * w)  # column-major, as COCO
            change = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu().numpy()  # waits for the group
            first = flat[:, 0].cpu().numpy()  # nothing left to wait for
            del on, flat
            # nonzero is row-major: each mask's changes are contiguous and in order.
            bounds = np.searchsorted(change[:, 0], np.arange(stop - start + 1))
            for i in range(stop - start):
                edges = change[bounds[i] : bounds[i + 1], 1] + 1
                counts.append(counts_from_edges(edges, h * w, starts_on=bool(first[i])))
    return counts
