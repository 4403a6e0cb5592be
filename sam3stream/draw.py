"""Draw detections onto an RGB frame: a translucent mask per detection, a box, a label.

Colors are stable per label (a hash of the text picks a palette entry), so the
same class keeps its color across frames, cameras and restarts.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from sam3stream import rle
from sam3stream.stream.frames import Detection
from sam3stream.zones import Zone

__all__ = ["PALETTE", "ZONE_COLOR", "draw_detections", "label_color", "resize_mask"]

# Distinct, saturated colors that stay readable on both dark and light scenes.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
)


# Zones are outlined in one colour that no label takes, so they never read as a detection.
ZONE_COLOR = (255, 255, 255)


def label_color(label: str) -> tuple[int, int, int]:
    # crc32, not hash(): str hashes are salted per process.
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def resize_mask(mask: npt.NDArray[np.bool_], height: int, width: int) -> npt.NDArray[np.bool_]:
    """Nearest-neighbour resize, for masks decoded at a size other than the frame's."""
    mh, mw = mask.shape
    if (mh, mw) == (height, width):
        return mask
    rows = (np.arange(height) * mh // height).clip(0, mh - 1)
    cols = (np.arange(width) * mw // width).clip(0, mw - 1)
    resized: npt.NDArray[np.bool_] = mask[rows[:, None], cols[None, :]]
    return resized


def draw_detections(
    image: npt.NDArray[np.uint8],
    detections: Sequence[Detection],
    *,
    masks: bool = True,
    boxes: bool = True,
    alpha: float = 0.45,
    zones: Sequence[Zone] = (),
) -> npt.NDArray[np.uint8]:
    """Return a copy of ``image`` ([H, W, 3] RGB uint8) with the detections drawn on it, over
    the outlines of ``zones`` (polygons in fractions of the frame) and their names."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {image.shape}")
    height, width = image.shape[:2]
    out = np.array(image, dtype=np.uint8, copy=True)

    if masks:
        # Blend in float only over masked pixels: cheap even for big frames.
        for det in detections:
            if det.mask is None:
                continue
            m = resize_mask(rle.decode(det.mask), height, width)
            tint = np.asarray(label_color(det.label), dtype=np.float32)
            px = out[m].astype(np.float32)
            out[m] = (px * (1.0 - alpha) + tint * alpha).round().astype(np.uint8)

    if zones or (boxes and detections):
        canvas = Image.fromarray(out)
        pen = ImageDraw.Draw(canvas)
        thickness = max(1, round(min(height, width) / 300))
        for name, polygon in zones:
            # Pixel centres: a corner at 1.0 is the last row or column, not one past it.
            corners = [(x * (width - 1), y * (height - 1)) for x, y in polygon]
            pen.line([*corners, corners[0]], fill=ZONE_COLOR, width=thickness)
            left, top, right, bottom = pen.textbbox((0, 0), name)
            tx = min(corners[0][0] + 2, width - (right - left) - 2)
            ty = min(corners[0][1] + 2, height - (bottom - top) - 2)
            pen.text((max(tx, 0), max(ty, 0)), name, fill=ZONE_COLOR)
        for det in detections if boxes else ():
            color = label_color(det.label)
            x0, y0, x1, y1 = (float(v) for v in det.box_px)
            pen.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=color, width=thickness)
            text = f"{det.label} {det.score:.2f}"
            left, top, right, bottom = pen.textbbox((x0, y0), text)
            # Put the label above the box, or inside it when the box touches the top edge.
            ty = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
            pen.rectangle((x0, ty, x0 + (right - left) + 4, ty + (bottom - top) + 2), fill=color)
            pen.text((x0 + 2, ty - (top - y0)), text, fill=(0, 0, 0))
        out = np.asarray(canvas, dtype=np.uint8).copy()
    return out
