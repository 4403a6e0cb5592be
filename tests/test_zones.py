"""Zones: which of a camera's regions a detection's anchor point is in."""

from __future__ import annotations

import msgspec
import pytest

from sam3stream.config import CameraConfig, ZoneConfig
from sam3stream.stream.frames import Detection
from sam3stream.zones import CameraZones, contains

SQUARE = ((0.2, 0.2), (0.6, 0.2), (0.6, 0.6), (0.2, 0.6))
# An L: the square's top-right quarter cut away.
ELL = ((0.2, 0.2), (0.4, 0.2), (0.4, 0.4), (0.6, 0.4), (0.6, 0.6), (0.2, 0.6))
# Two triangles meeting at (0.5, 0.5), one on the left edge and one on the right.
BOW_TIE = ((0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0))


@pytest.mark.parametrize(
    ("polygon", "point", "inside"),
    [
        (SQUARE, (0.4, 0.4), True),
        (SQUARE, (0.1, 0.4), False),
        (SQUARE, (0.4, 0.7), False),
        (ELL, (0.3, 0.3), True),
        (ELL, (0.5, 0.3), False),  # in the cut-away corner
        (ELL, (0.5, 0.5), True),
        (BOW_TIE, (0.2, 0.5), True),
        (BOW_TIE, (0.8, 0.5), True),
        (BOW_TIE, (0.5, 0.2), False),
        (tuple(reversed(ELL)), (0.5, 0.3), False),  # either winding
        (tuple(reversed(ELL)), (0.3, 0.5), True),
    ],
)
def test_contains(polygon: tuple[tuple[float, float], ...], point: tuple[float, float], inside: bool) -> None:
    assert contains(polygon, *point) is inside


def detection(box: tuple[float, float, float, float], label: str = "person") -> Detection:
    return Detection(label=label, score=0.9, box=box, box_px=tuple(v * 100 for v in box))  # type: ignore[arg-type]


def test_detections_name_their_zones_in_config_order() -> None:
    zones = CameraZones((("left", SQUARE), ("all", ((0, 0), (1, 0), (1, 1), (0, 1)))))
    inside, outside = detection((0.3, 0.3, 0.5, 0.5)), detection((0.7, 0.7, 0.9, 0.9))
    out = zones.apply([inside, outside])
    assert [d.zones for d in out] == [["left", "all"], ["all"]]
    assert out[0].box == inside.box and out[0].mask is None  # nothing else changes


def test_the_bottom_anchor_is_where_a_person_stands() -> None:
    # A tall box whose centre is above the zone and whose feet are in it.
    standing = detection((0.3, 0.0, 0.5, 0.3))
    centre, feet = CameraZones((("floor", SQUARE),)), CameraZones((("floor", SQUARE),), anchor="bottom")
    assert centre.names(standing) == []
    assert feet.names(standing) == ["floor"]


def test_a_box_cut_off_at_the_frames_edge_is_in_a_zone_drawn_to_that_edge() -> None:
    # Boxes are clipped to the frame: feet out of the picture are at exactly 1.0.
    floor = ((0.3, 0.5), (0.7, 0.5), (0.8, 1.0), (0.2, 1.0))
    right = ((0.5, 0.0), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0))
    zones = CameraZones((("floor", floor), ("right", right)), anchor="bottom")
    assert zones.names(detection((0.3, 0.6, 0.45, 1.0))) == ["floor"]
    assert zones.names(detection((0.9, 0.2, 1.0, 1.0))) == ["right"]  # x at 0.95, feet at 1.0
    assert CameraZones((("right", right),)).names(detection((1.0, 0.4, 1.0, 0.6))) == ["right"]


def test_only_in_zones_drops_the_rest_and_a_detection_in_none_is_left_as_it_was() -> None:
    inside, outside = detection((0.3, 0.3, 0.5, 0.5)), detection((0.7, 0.7, 0.9, 0.9))
    assert CameraZones((("z", SQUARE),), only_in_zones=True).apply([outside, inside]) == [
        msgspec.structs.replace(inside, zones=["z"])
    ]
    kept = CameraZones((("z", SQUARE),)).apply([outside])
    assert kept == [outside]
    assert b'"zones"' not in msgspec.json.encode(kept[0])  # left out of the JSON when in none


def test_camera_zones_come_from_the_camera_config() -> None:
    cam = CameraConfig(
        name="door",
        url="a.mp4",
        zones=[ZoneConfig(name="mat", polygon=list(SQUARE))],
        zone_anchor="bottom",
        only_in_zones=True,
    )
    assert CameraZones.of(cam) == CameraZones((("mat", SQUARE),), anchor="bottom", only_in_zones=True)
    assert CameraZones.of(CameraConfig(name="plain", url="b.mp4")) is None
