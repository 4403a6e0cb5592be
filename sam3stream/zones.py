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

from sam3stream.stream.frames import Detection

if TYPE_CHECKING:
    from sam3stream.config import CameraConfig

__all__ = ["Anchor", "CameraZones", "Point", "Zone", "contains"]

Anchor = Literal["center", "bottom"]
Point = tuple[float, float]
Zone = tuple[str, tuple[Point, ...]]  # (name, polygon)

# The largest float below 1: a point at the frame's right or bottom edge, moved inside.
_JUST_INSIDE = math.nextafter(1.0, 0.0)


def contains(polygon: Sequence[Point], x: float, y: float) -> bool:
    """Whether (x, y) is inside ``polygon`` (its vertices in order, closed implicitly)."""
    inside = False
    x0, y0 = polygon[-1]
    for x1, y1 in polygon:
        # The edge (x0, y0)-(x1, y1) crosses the horizontal line through y to the right of x.
        if (y1 > y) != (y0 > y) and x < x0 + (y - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
        x0, y0 = x1, y1
    return inside


@dataclass(frozen=True, slots=True)
class CameraZones:
    """One camera's zones: ``apply`` names each detection's zones in ``Detection.zones``
    (in the order the zones are configured) and, with ``only_in_zones``, drops those in none."""

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

    def point(self, detection: Detection) -> Point:
        x1, y1, x2, y2 = detection.box
        x, y = (x1 + x2) / 2, (y2 if self.anchor == "bottom" else (y1 + y2) / 2)
        return min(x, _JUST_INSIDE), min(y, _JUST_INSIDE)

    def names(self, detection: Detection) -> list[str]:
        x, y = self.point(detection)
        return [name for name, polygon in self.zones if contains(polygon, x, y)]

    def apply(self, detections: list[Detection]) -> list[Detection]:
        out = []
        for d in detections:
            names = self.names(d)
            if names or not self.only_in_zones:
                out.append(msgspec.structs.replace(d, zones=names) if names else d)
        return out
