"""Synthetic test clips: coloured shapes bouncing over a real photo, H.264 in mp4.

The photos are scikit-image's bundled sample images (no download). Every clip
is fully determined by its :class:`ClipSpec` (the seed picks the shapes), so a
clip written twice has the same frames. Files are written under a temporary
name and renamed, so a clip that exists on disk is complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np
import numpy.typing as npt
import structlog
from PIL import Image

__all__ = ["DEFAULT_CLIPS", "ClipSpec", "Shape", "ensure_clips", "make_shapes", "render_frames", "write_clip"]

log = structlog.get_logger(__name__)

RGB = npt.NDArray[np.uint8]

# Saturated colours that stand out from the photos.
COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (240, 50, 230),
)


@dataclass(frozen=True, slots=True)
class ClipSpec:
    """One clip: ``photo`` names a function of ``skimage.data`` (astronaut, coffee, ...)."""

    name: str
    photo: str
    seed: int
    width: int = 640
    height: int = 360
    fps: int = 25
    seconds: float = 3.0
    shapes: int = 4

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ValueError(f"clip size must be even and at least 16x16, got {self.width}x{self.height}")
        if self.fps < 1 or self.frames < 1:
            raise ValueError(
                f"a clip needs fps >= 1 and at least one frame, got {self.fps} fps x {self.seconds} s"
            )

    @property
    def frames(self) -> int:
        return round(self.fps * self.seconds)


DEFAULT_CLIPS: tuple[ClipSpec, ...] = (
    ClipSpec("astronaut", "astronaut", seed=1),
    ClipSpec("coffee", "coffee", seed=2),
    ClipSpec("chelsea", "chelsea", seed=3),
    ClipSpec("rocket", "rocket", seed=4),
)


@dataclass(slots=True)
class Shape:
    """A filled circle (``size`` = radius) or rectangle (``size`` = half width, half height)."""

    kind: Literal["circle", "rect"]
    color: tuple[int, int, int]
    size: tuple[int, int]
    x: float  # centre
    y: float
    vx: float  # pixels per frame
    vy: float

    def step(self, width: int, height: int) -> None:
        """Move one frame; bounce off the frame's edges (the shape stays fully inside)."""
        half_w, half_h = self.size
        self.x, self.vx = _bounce(self.x + self.vx, self.vx, half_w, width - half_w)
        self.y, self.vy = _bounce(self.y + self.vy, self.vy, half_h, height - half_h)

    def mask(self, width: int, height: int) -> npt.NDArray[np.bool_]:
        ys, xs = np.ogrid[:height, :width]
        half_w, half_h = self.size
        if self.kind == "circle":
            inside: npt.NDArray[np.bool_] = (xs - self.x) ** 2 + (ys - self.y) ** 2 <= half_w**2
            return inside
        return (np.abs(xs - self.x) <= half_w) & (np.abs(ys - self.y) <= half_h)


def _bounce(pos: float, vel: float, lo: float, hi: float) -> tuple[float, float]:
    if pos < lo:
        return 2 * lo - pos, abs(vel)
    if pos > hi:
        return 2 * hi - pos, -abs(vel)
    return pos, vel


def make_shapes(spec: ClipSpec) -> list[Shape]:
    """The clip's shapes at frame 0, drawn from ``spec.seed``."""
    rng = np.random.default_rng(spec.seed)
    short = min(spec.width, spec.height)
    shapes = []
    for i in range(spec.shapes):
        kind: Literal["circle", "rect"] = "circle" if rng.random() < 0.5 else "rect"
        if kind == "circle":
            r = int(rng.integers(short // 16, short // 7))
            size = (r, r)
        else:
            size = (int(rng.integers(short // 14, short // 5)), int(rng.integers(short // 16, short // 7)))
        speed = rng.uniform(2.0, 6.0)
        angle = rng.uniform(0, 2 * np.pi)
        shapes.append(
            Shape(
                kind=kind,
                color=COLORS[(spec.seed + i) % len(COLORS)],
                size=size,
                x=float(rng.uniform(size[0], spec.width - size[0])),
                y=float(rng.uniform(size[1], spec.height - size[1])),
                vx=float(speed * np.cos(angle)),
                vy=float(speed * np.sin(angle)),
            )
        )
    return shapes


def background(photo: str, width: int, height: int) -> RGB:
    """A scikit-image sample photo scaled to cover ``width`` x ``height`` and centre-cropped."""
    import skimage.data

    loader = getattr(skimage.data, photo, None)
    if loader is None:
        raise ValueError(f"skimage.data has no sample image {photo!r}")
    pixels = np.asarray(loader())
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    image = Image.fromarray(pixels[..., :3].astype(np.uint8))
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - width) // 2, (h - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.uint8)


def render_frames(spec: ClipSpec) -> Iterator[RGB]:
    """The clip's frames, [H, W, 3] uint8 RGB, ``spec.frames`` of them."""
    base = background(spec.photo, spec.width, spec.height)
    shapes = make_shapes(spec)
    for _ in range(spec.frames):
        frame = base.copy()
        for shape in shapes:
            frame[shape.mask(spec.width, spec.height)] = shape.color
        yield frame
        for shape in shapes:
            shape.step(spec.width, spec.height)


def write_clip(spec: ClipSpec, path: Path) -> Path:
    """Encode the clip as H.264 (yuv420p) in mp4 at ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.mp4")
    with av.open(str(partial), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(spec.fps)}
        for rgb in render_frames(spec):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)
    return path


def ensure_clips(
    directory: Path,
    specs: Sequence[ClipSpec] = DEFAULT_CLIPS,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """``<directory>/<name>.mp4`` for each spec, writing only the ones that are missing.

    A clip already there is kept as it is, whatever spec it was written with.
    """
    paths = []
    for spec in specs:
        path = directory / f"{spec.name}.mp4"
        if path.is_file():
            log.debug("demo_clip_cached", path=str(path))
            if progress is not None:
                progress(f"kept clip {path} (already there, as it was written)")
        else:
            if progress is not None:
                progress(f"writing clip {path} ({spec.width}x{spec.height}, {spec.frames} frames)")
            write_clip(spec, path)
            log.info(
                "demo_clip_written", path=str(path), frames=spec.frames, size=f"{spec.width}x{spec.height}"
            )
        paths.append(path)
    return paths
