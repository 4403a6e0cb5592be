"""Raw decoder outputs -> per-frame detections (numpy only: this runs on the host, next to the GPU loop).

For frame ``b`` every (class, query) row whose score reaches that class's threshold becomes a
:class:`Detection`: its box mapped to the original frame, its mask logits resized to the output
size, thresholded at logit 0 and run-length encoded. No NMS: SAM 3's decoder already yields one
query per object, and the caller decides what to do with overlaps.

The model sees the frame squashed to a square (a plain resize, no letterbox), so a box normalized
to that square is the same box normalized to the original frame, and mask logits stretch back to
the frame's aspect ratio with an ordinary non-uniform resize.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from sam3stream.rle import encode
from sam3stream.runtime.types import RawOutputs
from sam3stream.stream.frames import Detection, Rle

__all__ = ["resize_bilinear", "to_detections"]

F32 = npt.NDArray[np.float32]
_Axis = tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], F32, F32]


@lru_cache(maxsize=64)
def _axis_table(in_size: int, out_size: int) -> _Axis:
    """Source taps and weights along one axis, as torch's bilinear with align_corners=False.

    torch: ``src = (dst + 0.5) * (in / out) - 0.5``, clamped at 0; taps ``floor(src)`` and the next
    index (the same index at the last row); weights ``1 - frac`` and ``frac``. Evaluated with
    torch's float32 numbers: its ratio ``in / out`` is a float32 (for 288 -> 1920 that alone moves
    source positions by ~1e-5 px, values by ~1e-4), and its kernel forms ``scale * x - 0.5`` as one
    fused multiply-add, i.e. exactly and rounded once to float32, which float64 then a cast
    reproduces. Cached per size pair (every frame of a camera needs the same tables) and read-only
    so the cache cannot be corrupted.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    low = np.minimum(np.floor(src).astype(np.intp), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = np.clip(src - low.astype(np.float32), np.float32(0.0), np.float32(1.0))
    tables = (low, high, np.float32(1.0) - frac, frac)
    for t in tables:
        t.flags.writeable = False
    return tables


# Output rows per step of the row pass: keeps the temporaries (~250 KB at 1920 wide) in cache,
# which is ~30% faster at full HD than one pass over the whole frame.
_ROW_BLOCK = 32


def _source_and_tables(image: F32, width: int, height: int) -> tuple[F32, _Axis, _Axis]:
    """``image`` as float32 and its (x, y) tap tables for a [height, width] output; raises on a
    non-2-D image or an empty output size."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {image.shape}")
    if width <= 0 or height <= 0:
        raise ValueError(f"output size must be positive, got {width}x{height}")
    src = np.asarray(image, dtype=np.float32)
    in_h, in_w = src.shape
    return src, _axis_table(in_w, width), _axis_table(in_h, height)


def _row_blocks(image: F32, width: int, height: int) -> Iterator[tuple[int, int, F32]]:
    """Bilinear resize of ``image`` to [height, width], yielded as (start, stop, rows) blocks.

    Separable, in the order torch's CPU kernel combines taps: along x (``w0 * a + w1 * b``) on
    the small input first, then along y over whole rows of that, which gathers contiguous rows.
    """
    src, (x0, x1, wx0, wx1), (y0, y1, wy0, wy1) = _source_and_tables(image, width, height)
    cols = src[:, x0] * wx0 + src[:, x1] * wx1  # [in_h, width]
    for start in range(0, height, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, height)
        a = cols[y0[start:stop]] * wy0[start:stop, None]
        a += cols[y1[start:stop]] * wy1[start:stop, None]
        yield start, stop, a


def resize_bilinear(image: F32, width: int, height: int) -> F32:
    """Resize a 2-D float array to [height, width] like ``F.interpolate(mode="bilinear")``.

    align_corners=False, no antialiasing; float32 out, equal to torch's CPU result within a few
    float32 ulps.
    """
    out = np.empty((height, width), dtype=np.float32)
    for start, stop, rows in _row_blocks(image, width, height):
        out[start:stop] = rows
    return out


def _interpolated_mask(src: F32, width: int, height: int) -> npt.NDArray[np.bool_]:
    """``resize_bilinear(src) > 0`` pixel by pixel, without materializing the float frame."""
    mask = np.empty((height, width), dtype=np.bool_)
    for start, stop, rows in _row_blocks(src, width, height):
        np.greater(rows, 0.0, out=mask[start:stop])
    return mask


# Below this a positive tap might round to zero once weighted; such cells are computed exactly.
_SAFE_POSITIVE = np.float32(1e-30)
# Past this share of source cells on the mask's edge, interpolating every pixel is cheaper.
_EDGE_SHARE = 0.2


def _resized_mask(logits: F32, width: int, height: int) -> npt.NDArray[np.bool_]:
    """``resize_bilinear(logits, width, height) > 0``, exactly, interpolating only the edge.

    An output pixel is a sum, with non-negative weights, of the four source values at its taps
    (rows ``y0``, ``y1``, columns ``x0``, ``x1``; ``y1``/``x1`` follow from ``y0``/``x0``), so
    every pixel of a source cell whose four values are positive (and not so small that a weight
    could round them to 0) is set, and every pixel of a cell with none positive is clear. Only
    the pixels of the other cells, the mask's edge, are interpolated, with the same float32
    operations as ``resize_bilinear``. A 288x288 mask of one object at 1920x1080 interpolates a
    few percent of the pixels; noise-like logits fall back to interpolating all of them.
    """
    src, (x0, x1, wx0, wx1), (y0, y1, wy0, wy1) = _source_and_tables(logits, width, height)
    in_h, in_w = src.shape
    if height * width <= in_h * in_w:  # no bigger than the source: the cell tables cost more
        return _interpolated_mask(src, width, height)
    # Cell (r, c) has the taps the tables pair with low taps r and c.
    nxt_r = np.minimum(np.arange(in_h) + 1, in_h - 1)
    nxt_c = np.minimum(np.arange(in_w) + 1, in_w - 1)
    # +inf is not "on": a zero weight times inf is NaN, which is not > 0.
    on = (src >= _SAFE_POSITIVE) & (src < np.inf)
    off = ~(src > 0)  # NaN is neither on nor off: its cells are interpolated
    on &= on[:, nxt_c]
    on &= on[nxt_r]
    off &= off[:, nxt_c]
    off &= off[nxt_r]
    edge_r, edge_c = np.nonzero(~(on | off))
    if edge_r.size > _EDGE_SHARE * on.size:
        return _interpolated_mask(src, width, height)
    # Pixels per cell along each axis, and where each cell's pixels start (taps never decrease).
    per_row = np.bincount(y0, minlength=in_h)
    per_col = np.bincount(x0, minlength=in_w)
    row_start = np.cumsum(per_row) - per_row
    col_start = np.cumsum(per_col) - per_col
    mask = np.repeat(np.repeat(on, per_col, axis=1), per_row, axis=0)
    # Every pixel of every edge cell: cell k covers per_row[r] x per_col[c] pixels.
    heights, widths = per_row[edge_r], per_col[edge_c]
    sizes = heights * widths
    cell = np.repeat(np.arange(sizes.size), sizes)
    local = np.arange(cell.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    i = row_start[edge_r][cell] + local // widths[cell]
    j = col_start[edge_c][cell] + local % widths[cell]
    # The same operations, in the same order, as _row_blocks: along x, then along y.
    top = src[y0[i], x0[j]] * wx0[j] + src[y0[i], x1[j]] * wx1[j]
    bottom = src[y1[i], x0[j]] * wx0[j] + src[y1[i], x1[j]] * wx1[j]
    value = top * wy0[i]
    value += bottom * wy1[i]
    mask[i, j] = value > 0
    return mask


def to_detections(
    raw: RawOutputs,
    b: int,
    labels: Sequence[str],
    thresholds: Sequence[float],
    width: int,
    height: int,
    mask_size: tuple[int, int] | None = None,
) -> list[Detection]:
    """Detections of frame ``b`` of ``raw``, best score first.

    ``labels``/``thresholds`` are per class (prompt order). ``width``/``height`` are the original
    frame's size; masks are produced at that size unless ``mask_size`` = (w, h) says otherwise.
    A kept row whose mask did not cross from the device (score below the backend's ``min_score``)
    gets ``mask=None``.
    """
    if not 0 <= b < raw.batch:
        raise IndexError(f"frame {b} is outside the batch of {raw.batch}")
    scores = raw.scores[b]  # [C, K]
    classes = scores.shape[0]
    if len(labels) != classes or len(thresholds) != classes:
        raise ValueError(
            f"{classes} classes in the outputs, {len(labels)} labels, {len(thresholds)} thresholds"
        )
    mask_w, mask_h = mask_size if mask_size is not None else (width, height)

    # Compare in float64: a float32 score and a Python float threshold, each taken exactly.
    keep = scores.astype(np.float64) >= np.asarray(thresholds, dtype=np.float64)[:, None]
    cs, ks = np.nonzero(keep)  # row-major: by class, then query
    if cs.size == 0:
        return []
    order = np.argsort(-scores[cs, ks], kind="stable")

    rows: dict[tuple[int, int], int] = {}
    for row in np.flatnonzero(raw.mask_index[:, 0] == b):
        _, c, k = raw.mask_index[row]
        rows[int(c), int(k)] = int(row)

    detections: list[Detection] = []
    for i in order:
        c, k = int(cs[i]), int(ks[i])
        x1, y1, x2, y2 = (float(v) for v in np.clip(raw.boxes[b, c, k], 0.0, 1.0))
        n = rows.get((c, k))
        mask: Rle | None = None
        if n is not None:
            mask = encode(_resized_mask(raw.masks[n], mask_w, mask_h))
        detections.append(
            Detection(
                label=labels[c],
                score=float(scores[c, k]),
                box=(x1, y1, x2, y2),
                box_px=(x1 * width, y1 * height, x2 * width, y2 * height),
                mask=mask,
            )
        )
    return detections
