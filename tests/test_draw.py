from __future__ import annotations

import numpy as np
import pytest

from sam3stream import rle
from sam3stream.draw import ZONE_COLOR, draw_detections, label_color, resize_mask
from sam3stream.stream.frames import Detection


def detection(
    mask: np.ndarray | None, box: tuple[float, float, float, float], label: str = "cat"
) -> Detection:
    h, w = mask.shape if mask is not None else (100, 100)
    return Detection(
        label=label,
        score=0.87,
        box=(box[0] / w, box[1] / h, box[2] / w, box[3] / h),
        box_px=box,
        mask=rle.encode(mask) if mask is not None else None,
    )


def test_mask_tints_only_its_pixels() -> None:
    image = np.full((60, 80, 3), 100, dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:30, 20:50] = True
    out = draw_detections(image, [detection(mask, (20, 10, 50, 30))], boxes=False, alpha=0.5)
    assert out is not image and (image == 100).all()  # the input is left alone
    changed = (out != image).any(axis=2)
    assert (changed == mask).all()
    expected = np.round(100 * 0.5 + np.array(label_color("cat")) * 0.5)
    assert (out[15, 25] == expected).all()


def test_boxes_and_labels_draw_outline_and_text() -> None:
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    out = draw_detections(image, [detection(None, (40, 50, 120, 100))], masks=False)
    color = np.array(label_color("cat"))
    assert (out[75, 40] == color).all() and (out[75, 120] == color).all()  # left and right edges
    assert (out[75, 80] == 0).all()  # the inside stays untouched
    # The label sits above the box: a filled band with dark text in it.
    band = out[30:50, 40:100]
    assert (band == color).all(axis=2).sum() > 100
    assert (band == 0).all(axis=2).sum() > 10


def test_label_at_top_edge_goes_inside_the_box() -> None:
    image = np.zeros((80, 80, 3), dtype=np.uint8)
    out = draw_detections(image, [detection(None, (5, 0, 70, 60))], masks=False)
    assert (out[5:12, 10:30] == np.array(label_color("cat"))).all(axis=2).any()


def test_mask_at_another_resolution_is_scaled_to_the_frame() -> None:
    small = np.zeros((30, 40), dtype=bool)
    small[:15, :] = True  # top half
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    out = draw_detections(image, [detection(small, (0, 0, 80, 30))], boxes=False)
    changed = (out != 0).any(axis=2)
    assert changed[:30].all() and not changed[30:].any()
    assert resize_mask(small, 60, 80).shape == (60, 80)


def test_colors_are_stable_per_label() -> None:
    assert label_color("person") == label_color("person")
    assert len({label_color(x) for x in ("person", "car", "dog", "bike", "truck")}) >= 3


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        draw_detections(np.zeros((4, 4), dtype=np.uint8), [])


def test_zones_are_outlined_with_their_names_and_their_insides_left_alone() -> None:
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    zone = ("dock", ((0.1, 0.2), (0.6, 0.2), (0.6, 0.8), (0.1, 0.8)))
    out = draw_detections(image, [], zones=[zone])
    white = np.array(ZONE_COLOR)

    def on_line(rows: slice | int, cols: slice | int) -> bool:  # within a pixel of where it falls
        return bool((out[rows, cols] == white).all(axis=-1).any())

    assert on_line(50, slice(19, 22)) and on_line(50, slice(118, 121))  # left and right edges
    assert on_line(slice(19, 22), 90) and on_line(slice(78, 81), 90)  # top and bottom
    assert (out[40:75, 40:110] == 0).all()  # inside: untouched
    assert out[22:34, 22:60].max() > 100  # the name, by the first corner
    assert (draw_detections(image, []) == 0).all()  # no zones, nothing drawn


def test_a_zone_along_the_frames_edges_is_drawn_on_them_and_named_inside() -> None:
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    whole = ("all", ((1.0, 1.0), (0.0, 1.0), (0.0, 0.0), (1.0, 0.0)))  # first corner: bottom right
    out = draw_detections(image, [], zones=[whole])
    assert (out[99, 50:150] == ZONE_COLOR).all() and (out[20:80, 199] == ZONE_COLOR).all()
    assert out[80:97, 150:197].max() > 100  # the name, kept inside the frame by its first corner
