"""Messages that flow between actors."""

from __future__ import annotations

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = ["SCHEMA_VERSION", "Detection", "Frame", "FrameResult", "Rle", "StageTimes"]

# Bumped whenever a field of FrameResult/Detection changes meaning or is removed.
SCHEMA_VERSION = 1


class Frame(msgspec.Struct, gc=False, kw_only=True):
    """One decoded frame, already resized to the model's R x R input.

    ``image`` is the frame at its original size (kept only when a sink draws on it).
    """

    camera: str
    seq: int  # 0, 1, 2, ... per camera, in decode order; never reused
    pts: int | None  # presentation timestamp in stream time_base units
    stream_time: float | None  # pts in seconds
    capture_time: float  # wall clock (time.time()) when decoded
    width: int  # original frame size
    height: int
    pixels: npt.NDArray[np.uint8]  # [R, R, 3] RGB for the model
    image: npt.NDArray[np.uint8] | None = None  # [H, W, 3] RGB original, for drawing sinks
    enqueued: float = 0.0  # monotonic time it entered the batcher's queue


class Rle(msgspec.Struct, gc=False):
    """COCO run-length encoding (column-major), ``counts`` in the compressed string form."""

    size: tuple[int, int]  # (height, width)
    counts: str


class Detection(msgspec.Struct, gc=False, omit_defaults=True):
    label: str
    score: float
    box: tuple[float, float, float, float]  # normalized xyxy, 0..1 of the original frame
    box_px: tuple[float, float, float, float]  # xyxy in pixels of the original frame
    mask: Rle | None = None


class StageTimes(msgspec.Struct, gc=False):
    """Milliseconds spent per stage for this frame (batch stages are shared by its batch)."""

    queue_wait: float = 0.0
    preprocess: float = 0.0
    vision: float = 0.0
    decoder: float = 0.0
    postprocess: float = 0.0
    end_to_end: float = 0.0  # capture -> result ready
    batch_size: int = 0


class FrameResult(msgspec.Struct, gc=False, kw_only=True):
    schema: int = SCHEMA_VERSION
    camera: str
    seq: int
    pts: int | None
    stream_time: float | None
    capture_time: float
    width: int
    height: int
    detections: list[Detection]
    timing: StageTimes
