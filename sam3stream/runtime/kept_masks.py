"""What completes a torch batch's outputs with its kept masks: their logits copied to the host,
or encoded on the device (runtime/mask_encode.py), now or while the next batch computes.

A submitted batch is a :class:`Pending` in two steps: ``collect`` takes its outputs out of the
backend's shared buffers (before the next batch's compute may start) and returns what completes
them, which can then run while the next batch computes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.runtime.mask_encode import encode_kept_masks, encode_masks, kept_rows
from sam3stream.runtime.types import RawOutputs

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFERRED_MASKS",
    "MASK_CHUNK",
    "Pending",
    "already_complete",
    "gather_masks",
    "with_encoded_masks",
]

log = structlog.get_logger(__name__)

# Kept masks cross to the host this many at a time: the device holds one chunk's copy, not one
# per kept mask (a threshold of 0 at 1008 x 8 keeps 1600, which held 760 MiB more at once).
MASK_CHUNK = 64
# Up to this many kept masks are encoded while the next batch computes (their logits copied out
# of the shared buffers first: 42 MiB at 1008 in bf16); more are encoded before it starts.
DEFERRED_MASKS = 256


class Pending:
    """A submitted batch: ``result()`` waits for the GPU and returns the outputs.

    In two steps: ``collect`` takes the batch's outputs out of the backend's shared buffers
    (the next batch's compute must not start before it), and returns what completes them
    (encoding kept masks), which can then run while the next batch computes.
    """

    def __init__(self, collect: Callable[[], Callable[[], RawOutputs]]) -> None:
        self._collect: Callable[[], Callable[[], RawOutputs]] | None = collect
        self._complete: Callable[[], RawOutputs] | None = None
        self._result: RawOutputs | None = None

    def collect(self) -> None:
        if self._collect is not None:
            self._complete, self._collect = self._collect(), None

    def result(self) -> RawOutputs:
        if self._result is None:
            self.collect()
            assert self._complete is not None
            self._result, self._complete = self._complete(), None
        return self._result


def already_complete(result: RawOutputs) -> RawOutputs:
    """The completion of a result that is already complete."""
    return result


def gather_masks(masks: Any, index: Any) -> npt.NDArray[np.float32]:
    """The masks at ``index`` rows (frame, class, query) of ``masks`` [B, C, K, M, M], as float32
    on the host, copied in chunks of MASK_CHUNK."""
    count, size = int(index.shape[0]), int(masks.shape[-1])
    host = np.empty((count, size, size), np.float32)
    for start in range(0, count, MASK_CHUNK):
        rows = index[start : start + MASK_CHUNK]
        host[start : start + rows.shape[0]] = kept_rows(masks, rows).float().cpu().numpy()
    return host


def with_encoded_masks(
    result: RawOutputs,
    masks: torch.Tensor,
    kept_index: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    stream: Any,
    side: Any,
) -> Callable[[], RawOutputs]:
    """What completes ``result`` with its kept masks encoded at ``sizes``. On CUDA (``stream``:
    the batch's, ``side``: a stream idle by the time the next batch computes), and for up to
    DEFERRED_MASKS of them, their logits are copied out of the shared buffers on the batch's
    stream (ordered before the next batch's compute) and the encoding is left for later, on the
    side stream; otherwise they are encoded now."""
    import torch

    if not len(result.mask_index):  # the common case: nothing to copy out or wait for
        return functools.partial(already_complete, dataclasses.replace(result, mask_counts=()))
    if stream is None or side is None or len(result.mask_index) > DEFERRED_MASKS:
        now = _encoded_or_logits(
            result,
            lambda: encode_kept_masks(masks, kept_index, sizes),
            lambda: gather_masks(masks, kept_index),
            on_cuda=masks.is_cuda,
        )
        return functools.partial(already_complete, now)
    # The index was made on the current stream: keep its memory from being reused there
    # before the batch's stream has read it.
    kept_index.record_stream(stream)
    with torch.cuda.stream(stream):
        kept = kept_rows(masks, kept_index)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
    kept.record_stream(side)  # allocated on the batch's stream, read on the side stream
    frames = result.mask_index[:, 0]

    def later() -> RawOutputs:
        with torch.no_grad(), torch.cuda.stream(side):
            side.wait_event(ready)
            return _encoded_or_logits(
                result,
                lambda: encode_masks(kept, frames, sizes),
                lambda: np.asarray(kept.float().cpu().numpy(), np.float32),
                on_cuda=True,
            )

    return later


def _encoded_or_logits(
    result: RawOutputs,
    encode: Callable[[], list[npt.NDArray[np.int64]]],
    logits: Callable[[], npt.NDArray[np.float32]],
    *,
    on_cuda: bool,
) -> RawOutputs:
    """``result`` with its masks encoded; if the device runs out of memory for that, with
    their logits, for the host to encode: the batch is not lost over its masks."""
    import torch

    try:
        return dataclasses.replace(result, mask_counts=tuple(encode()))
    except torch.OutOfMemoryError as exc:
        if on_cuda:
            torch.cuda.empty_cache()
        log.warning(
            "mask_encoding_out_of_memory",
            masks=len(result.mask_index),
            detail="this batch's masks are encoded on the host",
            error=str(exc).splitlines()[0] if str(exc) else repr(exc),
        )
        return dataclasses.replace(result, masks=logits())
