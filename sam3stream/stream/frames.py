"""Messages that flow between actors."""

from __future__ import annotations

import secrets
import time

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = ["SCHEMA_VERSION", "Detection", "Frame", "FrameResult", "Rle", "StageTimes", "new_run_id"]

# Bumped whenever a field of FrameResult/Detection changes meaning or is removed.
SCHEMA_VERSION = 1


def new_run_id() -> str:
    """An identifier for one start of a pipeline: its UTC start time, then random hex
    (``20261206T091500Z-3f9a2c``), so that ids sort by start and two starts in one second differ."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


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
    """One object found in a frame.

    ``score`` is SAM 3's: the query's probability times the class's presence probability in the
    frame, 0..1, compared with the class's threshold. ``box`` is (x1, y1, x2, y2) as fractions of
    the original frame's width and height; ``box_px`` the same in its pixels (continuous
    coordinates: the frame spans 0..width). ``mask`` is present unless masks are off; its size is
    ``prompts.mask_size`` (given as [width, height]) or the frame's, as (height, width).
    ``sam3stream.rle.decode(mask)`` gives the boolean array. ``zones`` names the camera's zones
    the detection is in (``[[cameras.zones]]``; left out when it is in none).
    """

    label: str
    score: float
    box: tuple[float, float, float, float]  # normalized xyxy, 0..1 of the original frame
    box_px: tuple[float, float, float, float]  # xyxy in pixels of the original frame
    mask: Rle | None = None
    zones: list[str] = []


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
    """A frame's detections, best score first, as every sink gets them and ``Pipeline.results()``
    yields them.

    ``seq`` counts the camera's frames from 0 (a looping file keeps counting); ``pts`` and
    ``stream_time`` (seconds) are the stream's own clock when it has one; ``capture_time`` is
    the wall clock (``time.time()``) when the frame was decoded. ``width`` and ``height`` are the
    original frame's. ``timing`` holds milliseconds per stage. ``run`` identifies the pipeline's
    start (:func:`new_run_id`): ``seq`` starts from 0 again after a restart, so ``(run, camera,
    seq)`` is what names one frame's result for good.
    """

    schema: int = SCHEMA_VERSION
    run: str = ""
    camera: str
    seq: int
    pts: int | None
    stream_time: float | None
    capture_time: float
    width: int
    height: int
    detections: list[Detection]
    timing: StageTimes
