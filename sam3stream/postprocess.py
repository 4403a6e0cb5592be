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

from sam3stream.rle import counts_from_edges, counts_to_string
from sam3stream.runtime.types import RawOutputs
from sam3stream.stream.frames import Detection, Rle

__all__ = ["frame_outputs", "resize_bilinear", "to_detections"]

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


# Output columns per step of the dense pass: keeps its temporaries in cache.
_COLUMN_BLOCK = 64


def _dense_counts(src: F32, width: int, height: int) -> npt.NDArray[np.int64]:
    """COCO run lengths of ``resize_bilinear(src) > 0``, interpolating every pixel.

    The values are _row_blocks' (the same float32 operations on the same operands: along x on
    the small input, then along y), computed a block of output columns at a time into a
    column-major mask, so that the runs are read off in order without transposing two million
    pixels. For masks whose edge is too long for _mask_counts' edge path (noise-like ones)."""
    src, (x0, x1, wx0, wx1), (y0, y1, wy0, wy1) = _source_and_tables(src, width, height)
    src_t = np.ascontiguousarray(src.T)
    cols_t = src_t[x0] * wx0[:, None] + src_t[x1] * wx1[:, None]  # [width, in_h]
    flat = np.empty(width * height, dtype=np.bool_)
    mask_t = flat.reshape(width, height)  # column-major: each row is an output column
    for start in range(0, width, _COLUMN_BLOCK):
        block = cols_t[start : start + _COLUMN_BLOCK]
        values = np.take(block, y0, axis=1) * wy0
        values += np.take(block, y1, axis=1) * wy1
        np.greater(values, 0.0, out=mask_t[start : start + _COLUMN_BLOCK])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    return counts_from_edges(edges, flat.size, starts_on=bool(flat[0]))


# Below this a positive tap might round to zero once weighted; such cells are computed exactly.
_SAFE_POSITIVE = np.float32(1e-30)
# Past this share of source cells on the mask's edge, interpolating every pixel is cheaper: an
# edge pixel costs ~16 times a pixel of the dense pass (measured crossover ~6% at 1920x1080).
_EDGE_SHARE = 0.05
_OFF, _ON, _EDGE = 0, 1, 2


def _cell_states(src: F32) -> npt.NDArray[np.int8]:
    """Per source cell (its taps at rows r, r+1 and columns c, c+1, the last row and column
    pairing with themselves): _ON when all four values are positive (and not so small that a
    weight could round one to 0), so every output pixel in the cell is set; _OFF when none is
    positive, so none is; _EDGE otherwise. An output pixel is a sum of its cell's four values
    with non-negative weights, which is what makes the first two safe."""
    # +inf is not "on": a zero weight times inf is NaN, which is not > 0.
    on = (src >= _SAFE_POSITIVE) & (src < np.inf)
    off = ~(src > 0)  # NaN is neither on nor off: its cells are interpolated
    for flags in (on, off):  # with the next column, then the next row (the last: itself)
        flags[:, :-1] &= flags[:, 1:]
        flags[:-1] &= flags[1:]
    states = np.full(src.shape, _EDGE, np.int8)
    states[on] = _ON
    states[off] = _OFF
    return states


def _along_x(src: F32, x: _Axis, r: npt.NDArray[np.intp], j: npt.NDArray[np.intp]) -> F32:
    """Source row ``r`` interpolated at output column ``j``, pairwise: the first step of
    _row_blocks, with the same float32 operations."""
    x0, x1, wx0, wx1 = x
    return np.asarray(src[r, x0[j]] * wx0[j] + src[r, x1[j]] * wx1[j])


def _expand(counts: npt.NDArray[np.intp]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """For items with ``counts[n]`` copies each: the item of every copy and its copy number."""
    item = np.repeat(np.arange(counts.size), counts)
    copy = np.arange(item.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return item, copy


def _mask_counts(logits: F32, width: int, height: int) -> npt.NDArray[np.int64]:
    """COCO run lengths of ``resize_bilinear(logits, width, height) > 0``, exactly, without
    forming the mask.

    The output is walked in RLE order (column by column) as pieces: a run of source cells that
    are all on (or all off, see _cell_states) down a source column is one piece per output
    column it covers, whatever its height in pixels; only the pixels of edge cells are
    interpolated, one piece each. The runs are where the pieces' values change. A 288x288 mask
    of a few objects at 1920x1080 makes a few tens of thousands of pieces instead of two
    million pixels; noise-like logits (mostly edge) fall back to the whole frame.
    """
    src, x, y = _source_and_tables(logits, width, height)
    in_h, in_w = src.shape
    if height * width <= in_h * in_w:  # no bigger than the source: the cell tables cost more
        return _dense_counts(src, width, height)
    states = _cell_states(src)
    if np.count_nonzero(states == _EDGE) > _EDGE_SHARE * states.size:
        return _dense_counts(src, width, height)
    # Output rows and columns per cell (taps never decrease), and the first of each; cells
    # that no output pixel falls in (when an axis shrinks) are left out.
    per_row = np.bincount(y[0], minlength=in_h)
    per_col = np.bincount(x[0], minlength=in_w)
    rows, cols = np.flatnonzero(per_row), np.flatnonzero(per_col)
    row_start = (np.cumsum(per_row) - per_row)[rows]
    col_start = (np.cumsum(per_col) - per_col)[cols]
    # Down each source column (RLE order): a segment is a run of equal on/off cells or one
    # edge cell.
    state = states[np.ix_(rows, cols)].T.ravel()  # [source column, source row]
    new = np.ones(state.size, dtype=bool)
    new[1:] = (state[1:] != state[:-1]) | (state[1:] == _EDGE) | (state[:-1] == _EDGE)
    new[:: rows.size] = True  # every source column starts afresh
    first = np.flatnonzero(new)
    seg_col, seg_row = np.divmod(first, rows.size)
    seg_state = state[first]
    per_col_segments = np.bincount(seg_col, minlength=cols.size)
    col_first_segment = np.cumsum(per_col_segments) - per_col_segments
    # Each source column's segments, once per output column it covers, in output-column order.
    col, local = _expand(per_col[cols] * per_col_segments)
    segment = col_first_segment[col] + local % per_col_segments[col]
    out_col = col_start[col] + local // per_col_segments[col]
    # On/off segments are one piece; an edge cell is one piece per output row it covers.
    seg_row = seg_row[segment]
    is_edge = seg_state[segment] == _EDGE
    piece, k = _expand(np.where(is_edge, per_row[rows][seg_row], 1))
    i = row_start[seg_row][piece] + k
    j = out_col[piece]
    value = seg_state[segment][piece] == _ON
    # Edge cells: along x once per cell and output column, then along y for each of its rows.
    owner = np.flatnonzero(is_edge)
    r = rows[seg_row[owner]]
    top = _along_x(src, x, r, out_col[owner])
    bottom = _along_x(src, x, np.minimum(r + 1, in_h - 1), out_col[owner])
    edge = np.flatnonzero(is_edge[piece])
    of = (np.cumsum(is_edge) - 1)[piece[edge]]  # each edge piece's place in owner
    _, _, wy0, wy1 = y
    weighted = top[of] * wy0[i[edge]]
    weighted += bottom[of] * wy1[i[edge]]
    value[edge] = weighted > 0
    # Pieces start at flat column-major index j * height + i; the first one at 0.
    change = np.flatnonzero(value[1:] != value[:-1]) + 1
    return counts_from_edges(j[change] * height + i[change], height * width, starts_on=bool(value[0]))


def frame_outputs(raw: RawOutputs, b: int) -> RawOutputs:
    """Frame ``b`` of ``raw`` as a batch of one, with only its own masks: what a postprocessing
    process is sent (``to_detections(frame_outputs(raw, b), 0, ...)`` is frame b's detections)."""
    if not 0 <= b < raw.batch:
        raise IndexError(f"frame {b} is outside the batch of {raw.batch}")
    rows = np.flatnonzero(raw.mask_index[:, 0] == b)
    index = raw.mask_index[rows]
    index[:, 0] = 0
    return RawOutputs(
        scores=raw.scores[b : b + 1],
        boxes=raw.boxes[b : b + 1],
        presence=raw.presence[b : b + 1],
        query_index=raw.query_index[b : b + 1],
        masks=raw.masks[rows],
        mask_index=index,
        mask_counts=None if raw.mask_counts is None else tuple(raw.mask_counts[r] for r in rows),
    )


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
    gets ``mask=None``. Masks the backend encoded (``raw.mask_counts``) must be at that size.
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
            if raw.mask_counts is None:
                counts = _mask_counts(raw.masks[n], mask_w, mask_h)
            else:
                counts = raw.mask_counts[n]
            if int(counts.sum()) != mask_w * mask_h:
                raise ValueError(
                    f"mask of frame {b}, class {c}, query {k} has {int(counts.sum())} pixels, "
                    f"expected {mask_w}x{mask_h} (encoded at another size?)"
                )
            mask = Rle(size=(mask_h, mask_w), counts=counts_to_string(counts))
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
