"""Keeping only the masks that may be published (shared by the host-side backends)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["select_masks"]


def select_masks(
    scores: npt.NDArray[np.float32], masks: npt.NDArray[np.float32], min_score: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Masks [N, M, M] of the rows whose score reaches ``min_score``, and their (b, c, k) [N, 3]."""
    index = np.argwhere(scores >= min_score).astype(np.int64)
    if index.size == 0:
        size = masks.shape[-1]
        return np.zeros((0, size, size), np.float32), np.zeros((0, 3), np.int64)
    kept = masks[index[:, 0], index[:, 1], index[:, 2]].astype(np.float32, copy=False)
    return kept, index
