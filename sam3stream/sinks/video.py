"""Annotated video per camera: ``<dir>/<camera>.mp4`` (H.264, yuv420p).

Each result is drawn onto its full-size frame (masks, boxes, labels) and
encoded on a dedicated thread, one per sink, so PyAV's non-thread-safe
containers are only ever touched from that thread and frames stay in order.

Timing: with ``fps`` set the video is constant-rate at that fps; without it,
frames are stamped with their stream time (milliseconds), so a live camera's
dropped frames show as the real gaps instead of speeding the video up.

The mp4 is fragmented (``empty_moov``), a fragment per keyframe and a keyframe every
``KEYFRAME_S`` of recording: a process that dies without closing (kill -9, a power cut) still
leaves a playable file, losing at most the last few seconds.

With ``every_n`` > 1, every n-th result per camera is also saved as a PNG
snapshot next to the video.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
import numpy.typing as npt
import structlog
from av.video.stream import VideoStream
from PIL import Image

from sam3stream.draw import draw_detections
from sam3stream.stream.frames import FrameResult
from sam3stream.zones import Zone

if TYPE_CHECKING:
    from sam3stream.config import VideoSinkConfig
    from sam3stream.metrics import Metrics

__all__ = ["VideoSink"]

log = structlog.get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # no dots: they separate the file index
_MS = Fraction(1, 1000)
_DEFAULT_FPS = 10.0
# Seconds of recording between keyframes, hence between fragments: what a crash can lose.
# (x264's default, 250 frames, was over a minute at a few frames per second.)
KEYFRAME_S = 2.0


def _free_path(directory: Path, stem: str, suffix: str) -> Path:
    """``stem.suffix``, or ``stem.1.suffix``, ``stem.2.suffix``...: never overwrite a recording."""
    path = directory / f"{stem}{suffix}"
    n = 0
    while path.exists():
        n += 1
        path = directory / f"{stem}.{n}{suffix}"
    return path


class _Recording:
    """One camera's open mp4. Only touched from the sink's encoder thread."""

    def __init__(self, path: Path, width: int, height: int, fps: float | None, codec: str) -> None:
        self.path = path
        # yuv420p subsamples chroma 2x2: H.264 needs even dimensions.
        self.width = max(2, width - width % 2)
        self.height = max(2, height - height % 2)
        self.fps = fps
        self.container = av.open(
            str(path),
            mode="w",
            # Each fragment reaches the file when the muxer writes it, not when an I/O buffer fills.
            options={"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"},
        )
        try:
            self.stream = self._add_stream(codec, fps)
        except BaseException:
            self.container.close()
            raise
        self.frames = 0
        self.last_pts = -1
        self.first_time: float | None = None

    def _add_stream(self, codec: str, fps: float | None) -> VideoStream:
        rate = Fraction(fps if fps is not None else _DEFAULT_FPS).limit_denominator(1001)
        stream = self.container.add_stream(codec, rate=rate)
        if not isinstance(stream, VideoStream):
            raise ValueError(f"codec {codec!r} is not a video codec")
        stream.width = self.width
        stream.height = self.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = max(1, round(KEYFRAME_S * (fps or _DEFAULT_FPS)))
        # Millisecond ticks for stream-time stamps, one tick per frame at a fixed fps.
        stream.codec_context.time_base = _MS if fps is None else 1 / rate
        if codec == "libx264":
            # Recording must keep up with inference on a shared CPU.
            stream.options = {"preset": "veryfast"}
        return stream

    def _pts(self, stream_time: float | None) -> int:
        step = round(1000 / _DEFAULT_FPS)
        if self.fps is not None:
            pts = self.frames
        elif stream_time is None:
            pts = self.last_pts + step
        else:
            if self.first_time is None:
                self.first_time = stream_time
            pts = round((stream_time - self.first_time) * 1000)
            if pts <= self.last_pts:
                # Stream time went back (a looping file): re-anchor to continue from here.
                self.first_time = stream_time - (self.last_pts + step) / 1000
                pts = self.last_pts + step
        return max(pts, self.last_pts + 1)

    def write(self, image: npt.NDArray[np.uint8], stream_time: float | None) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        frame.pts = self._pts(stream_time)
        frame.time_base = self.stream.codec_context.time_base
        self.last_pts = frame.pts
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        try:
            self.container.mux(self.stream.encode(None))  # flush the encoder's delayed frames
        finally:
            self.container.close()


class VideoSink:
    """Lossless by default: the pipeline waits for the encoder rather than skipping frames."""

    wants_images = True

    def __init__(
        self,
        directory: str | Path,
        *,
        name: str = "video",
        fps: float | None = None,
        codec: str = "libx264",
        draw_masks: bool = True,
        draw_boxes: bool = True,
        every_n: int = 1,
        lossless: bool = True,
        metrics: Metrics | None = None,
        zones: Mapping[str, Sequence[Zone]] | None = None,
    ) -> None:
        """``zones``: each camera's, outlined under its detections."""
        self.name = name
        self.lossless = lossless
        self.directory = Path(directory)
        self.fps = fps
        self.codec = codec
        self.draw_masks = draw_masks
        self.draw_boxes = draw_boxes
        self.every_n = every_n
        self._metrics = metrics
        self.zones = dict(zones or {})
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{name}")
        self._recordings: dict[str, _Recording] = {}
        self._counts: dict[str, int] = {}
        self._warned_no_image: set[str] = set()

    @classmethod
    def from_config(
        cls,
        cfg: VideoSinkConfig,
        *,
        name: str,
        metrics: Metrics | None = None,
        zones: Mapping[str, Sequence[Zone]] | None = None,
    ) -> VideoSink:
        return cls(
            cfg.dir,
            name=name,
            fps=cfg.fps,
            codec=cfg.codec,
            draw_masks=cfg.draw_masks,
            draw_boxes=cfg.draw_boxes,
            every_n=cfg.every_n,
            lossless=cfg.on_full == "block",
            metrics=metrics,
            zones=zones,
        )

    def recording_path(self, camera: str) -> Path | None:
        rec = self._recordings.get(camera)
        return rec.path if rec is not None else None

    async def start(self) -> None:
        await self._in_thread(lambda: self.directory.mkdir(parents=True, exist_ok=True))
        log.info("sink_started", sink=self.name, kind="video", dir=str(self.directory), codec=self.codec)

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None:
        if image is None:
            # The pipeline did not keep the frame: nothing to draw on.
            if result.camera not in self._warned_no_image:
                self._warned_no_image.add(result.camera)
                log.warning("video_sink_no_image", sink=self.name, camera=result.camera)
            if self._metrics is not None:
                self._metrics.sink_dropped(self.name, 1)
            return
        await self._in_thread(lambda: self._write(result, image))

    async def aclose(self) -> None:
        try:
            await self._in_thread(self._close_all)
        finally:
            self._pool.shutdown(wait=False)
        log.info("sink_closed", sink=self.name, kind="video")

    # ------------------------------------------------------------------ encoder thread

    def _write(self, result: FrameResult, image: npt.NDArray[np.uint8]) -> None:
        drawn = draw_detections(
            image,
            result.detections,
            masks=self.draw_masks,
            boxes=self.draw_boxes,
            zones=self.zones.get(result.camera, ()),
        )
        camera = result.camera
        rec = self._recordings.get(camera)
        if rec is None:
            stem = _UNSAFE.sub("_", camera) or "_"
            path = _free_path(self.directory, stem, ".mp4")
            rec = _Recording(path, drawn.shape[1], drawn.shape[0], self.fps, self.codec)
            self._recordings[camera] = rec
            log.info(
                "video_recording",
                sink=self.name,
                camera=camera,
                path=str(path),
                width=rec.width,
                height=rec.height,
            )
        rec.write(drawn, result.stream_time)
        count = self._counts[camera] = self._counts.get(camera, 0) + 1
        if self.every_n > 1 and count % self.every_n == 0:
            stem = _UNSAFE.sub("_", camera) or "_"
            Image.fromarray(drawn).save(self.directory / f"{stem}-{result.seq:08d}.png")

    def _close_all(self) -> None:
        errors: list[BaseException] = []
        for camera, rec in self._recordings.items():
            try:
                rec.close()
                log.info("video_closed", sink=self.name, camera=camera, path=str(rec.path), frames=rec.frames)
            except Exception as exc:
                # Keep closing the others; a half-written file is still better than none.
                log.error("video_close_failed", sink=self.name, camera=camera, error=repr(exc))
                errors.append(exc)
        self._recordings.clear()
        if errors:
            raise errors[0]

    async def _in_thread(self, fn: Callable[[], object]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, fn)
