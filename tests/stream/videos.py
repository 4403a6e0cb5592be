"""Small test videos whose frames say which frame they are (solid gray level per index)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

__all__ = ["gray_level", "make_video"]


def gray_level(index: int) -> int:
    """The gray level frame ``index`` is painted with (distinct for the first 28 frames)."""
    return 16 + (index * 8) % 224


def make_video(
    path: Path,
    frames: int = 12,
    *,
    width: int = 64,
    height: int = 48,
    fps: int = 25,
    codec: str = "libx264",
    faststart: bool = True,
) -> Path:
    """Write ``frames`` solid-gray frames; ``faststart`` puts the index first so a cut file still plays."""
    options = {"movflags": "+faststart"} if faststart and path.suffix == ".mp4" else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "bf": "0", "g": "5"}
        for i in range(frames):
            rgb = np.full((height, width, 3), gray_level(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
