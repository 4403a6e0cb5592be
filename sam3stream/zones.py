"""Zones: named regions of a camera's picture, and which of them each detection is in.

A zone is a polygon in fractions of the frame's width and height, so it holds at any
resolution the camera sends. A detection is in a zone when one point of its box is: the
box's centre, or the middle of its bottom edge (``anchor = "bottom"``: where a person
stands, which for a camera looking down at a floor is the point that belongs to the
zone drawn on it). The test is even-odd (a ray's crossings), so a zone that crosses
itself still has an inside; a point exactly on an edge may fall either way, except on the
frame's own edges: boxes are clipped to the frame, so a box cut off at the bottom has its
feet at exactly 1.0, and the point is moved just inside so that a zone drawn to the frame's
edge holds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from sam3stream.stream.frames import Detection

if TYPE_CHECKING:
    from sam3stream.config import CameraConfig

__all__ = ["Anchor", "CameraZones", "Point", "Zone", "contains", "inside"]

Anchor = Literal["center", "bottom"]
Point = tuple[float, float]
Zone = tuple[str, tuple[Point, ...]]  # (name, polygon)

# The largest float below 1: a point at the frame's right or bottom edge, moved inside.
_JUST_INSIDE = math.nextafter(1.0, 0.0)


def inside(polygon: Sequence[Point], xs: npt.ArrayLike, ys: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Which of the points (xs, ys) are inside ``polygon`` (its vertices in order, closed
    implicitly), element by element."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    result = np.zeros(np.broadcast(x, y).shape, dtype=np.bool_)
    x0, y0 = polygon[-1]
    for x1, y1 in polygon:
        if y1 != y0:  # a level edge never crosses the horizontal line through a point
            # The edge crosses the horizontal line through (x, y) to the right of x.
            result ^= ((y1 > y) != (y0 > y)) & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
        x0, y0 = x1, y1
    return result


def contains(polygon: Sequence[Point], x: float, y: float) -> bool:
    """Whether (x, y) is inside ``polygon``."""
    return bool(inside(polygon, x, y))


@dataclass(frozen=True, slots=True)
class CameraZones:
    """One camera's zones: ``apply`` names each detection's zones in ``Detection.zones``
    (in the order the zones are configured) and, with ``only_in_zones``, drops those in none;
    ``holds`` tells which of a frame's boxes are in one, so that the others can be left out
    before their masks are made."""

    zones: tuple[Zone, ...]
    anchor: Anchor = "center"
    only_in_zones: bool = False

    @classmethod
    def of(cls, camera: CameraConfig) -> CameraZones | None:
        """The camera's zones, or None when it has none (its detections pass as they are)."""
        if not camera.zones:
            return None
        zones = tuple((z.name, tuple(z.polygon)) for z in camera.zones)
        return cls(zones, anchor=camera.zone_anchor, only_in_zones=camera.only_in_zones)

    def anchors(self, boxes: npt.ArrayLike) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """The tested point of each box ([..., 4] xyxy, clipped to the frame as detections are)."""
        b = np.clip(np.asarray(boxes, dtype=np.float64), 0.0, 1.0)
        x = (b[..., 0] + b[..., 2]) / 2
        y = b[..., 3] if self.anchor == "bottom" else (b[..., 1] + b[..., 3]) / 2
        return np.minimum(x, _JUST_INSIDE), np.minimum(y, _JUST_INSIDE)

    def holds(self, boxes: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which boxes ([..., 4]) are in at least one zone."""
        x, y = self.anchors(boxes)
        found = np.zeros(x.shape, dtype=np.bool_)
        for _, polygon in self.zones:
            found |= inside(polygon, x, y)
        return found

    def names(self, detection: Detection) -> list[str]:
        x, y = self.anchors(detection.box)
        return [name for name, polygon in self.zones if inside(polygon, x, y)]

    def apply(self, detections: list[Detection]) -> list[Detection]:
        out = []
        for d in detections:
            names = self.names(d)
            if names or not self.only_in_zones:
                out.append(msgspec.structs.replace(d, zones=names) if names else d)
        return out
