"""sam3stream.postprocess: interpolation parity with torch, thresholds, boxes, masks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest

from sam3stream.postprocess import resize_bilinear, to_detections
from sam3stream.rle import decode, mask_counts
from sam3stream.runtime.types import RawOutputs
from tests.tool_modules import load_tool


def _torch_resize(image: npt.NDArray[np.float32], width: int, height: int) -> npt.NDArray[np.float32]:
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(image)[None, None]
    out = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    result: npt.NDArray[np.float32] = out[0, 0].numpy()
    return result


@pytest.mark.parametrize(
    ("in_h", "in_w", "height", "width"),
    [
        (8, 8, 32, 32),  # upsample
        (32, 32, 8, 8),  # downsample by an integer factor
        (72, 72, 41, 29),  # downsample, non-integer, non-square target
        (72, 72, 480, 640),  # upsample to a 4:3 frame
        (288, 288, 1080, 1920),  # full HD from SAM 3's mask size
        (13, 7, 5, 30),  # non-square input, mixed up/down
        (1, 1, 3, 4),  # degenerate input
        (5, 6, 5, 6),  # identity
    ],
)
def test_resize_matches_torch(in_h: int, in_w: int, height: int, width: int) -> None:
    rng = np.random.default_rng(in_h * 1000 + width)
    image = (rng.standard_normal((in_h, in_w)) * 4).astype(np.float32)
    got = resize_bilinear(image, width, height)
    assert got.shape == (height, width) and got.dtype == np.float32
    np.testing.assert_allclose(got, _torch_resize(image, width, height), rtol=0, atol=1e-5)


def _blobs(size: int, seed: int) -> npt.NDArray[np.float32]:
    """Mask logits of a few round objects (the generator tools/postprocess_bench.py times)."""
    logits: npt.NDArray[np.float32] = load_tool("postprocess_bench").blob_logits(size, seed)
    return logits


def _special(size: int) -> npt.NDArray[np.float32]:
    """Values where a shortcut could differ from interpolating: denormals, signed zeros,
    infinities, NaN, next to ordinary positives and negatives."""
    logits = _blobs(size, 5)
    tiny = np.float32(1e-45)
    logits[10:14, 10:14] = tiny  # positive, but a weight can round it to zero
    logits[20:22, 20:40] = -0.0
    logits[30, 30] = np.inf
    # Inside an object at the left edge: the first output columns put weight 0 on source column
    # 1, and 0 x inf is NaN, which is not > 0.
    logits[90:110, 0:6] = 4.0
    logits[100, 1] = np.inf
    logits[40, 40] = -np.inf
    logits[50, 50] = np.nan
    logits[60:62, 60:62] = 3e38  # sums overflow to inf
    return logits


def _exact_zeros(size: int) -> npt.NDArray[np.float32]:
    """Blobs with a patch of columns alternating -1 and 3: scaled by exactly 2, a pixel a quarter
    of the way from a -1 to a 3 interpolates to exactly 0, which is not > 0."""
    logits = _blobs(size, 6)
    logits[100:140, 100:140] = np.where(np.arange(40) % 2 == 0, -1.0, 3.0)
    return logits


MASKS = {
    "blobs": _blobs(288, 1),
    "other blobs": _blobs(288, 2),
    "noise": np.random.default_rng(3).standard_normal((288, 288)).astype(np.float32),
    "all on": np.full((288, 288), 2.0, np.float32),
    "all off": np.full((288, 288), -2.0, np.float32),
    "zeros": np.zeros((288, 288), np.float32),
    "special values": _special(288),
    "small, non-square": _blobs(72, 4)[:40],
    "exact zeros": _exact_zeros(288),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize(
    ("width", "height"),
    [(1920, 1080), (576, 576), (641, 359), (2000, 30), (3000, 100), (288, 288), (100, 77)],
)
@pytest.mark.parametrize("edge_share", ["default", "any", "none"])
def test_mask_runs_are_exactly_those_of_the_interpolated_logits_above_zero(
    name: str, width: int, height: int, edge_share: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the mask's edge is interpolated and no mask is formed; the runs must still be those
    of resize_bilinear(logits) > 0, the form that matches torch. (3000, 100) shrinks one axis
    and grows the other: source rows that no output row falls in. "any": the edge path is taken
    however much of the mask is edge (noise included), not only below the share where it pays;
    "none": the dense pass for every mask."""
    from sam3stream import postprocess
    from sam3stream.postprocess import _mask_counts

    if edge_share != "default":  # "any": always the edge path; "none": always the dense pass
        monkeypatch.setattr(postprocess, "_EDGE_SHARE", 1.0 if edge_share == "any" else -1.0)
    logits = MASKS[name]
    with np.errstate(invalid="ignore", over="ignore"):
        want = mask_counts(resize_bilinear(logits, width, height) > 0)
        got = _mask_counts(logits, width, height)
    assert got.dtype == np.int64
    assert got.sum() == width * height
    np.testing.assert_array_equal(got, want)


def _raw(
    scores: npt.NDArray[np.float32],
    boxes: npt.NDArray[np.float32],
    masks: npt.NDArray[np.float32],
    mask_index: npt.NDArray[np.int64],
) -> RawOutputs:
    b, c, k = scores.shape
    return RawOutputs(
        scores=scores,
        boxes=boxes,
        presence=np.ones((b, c), np.float32),
        query_index=np.broadcast_to(np.arange(k), (b, c, k)).astype(np.int64),
        masks=masks,
        mask_index=mask_index,
    )


def _example(min_score: float = 0.2) -> RawOutputs:
    """2 frames x 3 classes x 4 queries; masks kept for scores >= min_score, like a backend."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (2, 3, 4)).astype(np.float32)
    scores[1, 2, 3] = 0.5  # exactly at a threshold
    xy = rng.uniform(-0.1, 0.8, (2, 3, 4, 2))
    wh = rng.uniform(0.05, 0.5, (2, 3, 4, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    index = np.argwhere(scores >= min_score).astype(np.int64)
    masks = (rng.standard_normal((len(index), 16, 16)) * 3).astype(np.float32)
    return _raw(scores, boxes, masks, index)


def test_thresholds_per_class_and_order() -> None:
    raw = _example()
    thresholds = [0.3, 0.6, 0.5]
    for b in range(2):
        dets = to_detections(raw, b, ["person", "car", "dog"], thresholds, 640, 480)
        want = sorted(
            (
                (float(raw.scores[b, c, k]), c)
                for c in range(3)
                for k in range(4)
                if raw.scores[b, c, k] >= thresholds[c]
            ),
            key=lambda t: -t[0],
        )
        assert [(d.score, d.label) for d in dets] == [(s, ["person", "car", "dog"][c]) for s, c in want]
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    # The score exactly at its class threshold is kept.
    assert any(
        d.label == "dog" and d.score == 0.5
        for d in to_detections(raw, 1, ["a", "b", "dog"], [1, 1, 0.5], 8, 8)
    )
    assert to_detections(raw, 0, ["a", "b", "c"], [1.01] * 3, 8, 8) == []


def test_boxes_map_to_pixels() -> None:
    raw = _example()
    width, height = 1920, 1080
    dets = to_detections(raw, 0, ["a", "b", "c"], [0.0] * 3, width, height)
    assert len(dets) == 12
    flat = {(float(raw.scores[0, c, k])): (c, k) for c in range(3) for k in range(4)}
    for d in dets:
        c, k = flat[d.score]
        want = np.clip(raw.boxes[0, c, k].astype(np.float64), 0.0, 1.0)
        np.testing.assert_allclose(d.box, want, rtol=0, atol=1e-7)
        assert all(0.0 <= v <= 1.0 for v in d.box)
        np.testing.assert_allclose(d.box_px, want * [width, height, width, height], rtol=0, atol=1e-4)


@pytest.mark.parametrize("mask_size", [None, (37, 23)])
def test_masks_decode_to_thresholded_resized_logits(mask_size: tuple[int, int] | None) -> None:
    raw = _example(min_score=0.2)
    width, height = 64, 48
    rows = {(int(b), int(c), int(k)): n for n, (b, c, k) in enumerate(raw.mask_index)}
    for b in range(2):
        dets = to_detections(raw, b, ["a", "b", "c"], [0.0] * 3, width, height, mask_size)
        by_score = {float(raw.scores[b, c, k]): (c, k) for c in range(3) for k in range(4)}
        with_mask = 0
        for d in dets:
            c, k = by_score[d.score]
            n = rows.get((b, c, k))
            if n is None:
                assert d.score < 0.2 and d.mask is None
                continue
            with_mask += 1
            assert d.mask is not None
            out_w, out_h = mask_size or (width, height)
            assert d.mask.size == (out_h, out_w)
            want = _torch_resize(raw.masks[n], out_w, out_h) > 0
            np.testing.assert_array_equal(decode(d.mask), want)
        assert with_mask == int((raw.mask_index[:, 0] == b).sum())


def test_bad_arguments() -> None:
    raw = _example()
    with pytest.raises(ValueError):
        to_detections(raw, 0, ["a", "b"], [0.5, 0.5], 8, 8)
    with pytest.raises(ValueError):
        to_detections(raw, 0, ["a", "b", "c"], [0.5], 8, 8)
    with pytest.raises(IndexError):
        to_detections(raw, 2, ["a", "b", "c"], [0.5] * 3, 8, 8)
    with pytest.raises(ValueError):
        resize_bilinear(np.zeros((2, 2, 2), np.float32), 4, 4)


def test_does_not_import_torch() -> None:
    code = "import sys, sam3stream.postprocess; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_one_frame_of_outputs_gives_that_frames_detections() -> None:
    """What a postprocessing process is sent: frame b alone, with only its own masks."""
    from sam3stream.postprocess import frame_outputs

    raw = _example()
    labels, thresholds = ["a", "b", "c"], [0.2, 0.4, 0.6]
    for b in range(raw.batch):
        one = frame_outputs(raw, b)
        assert one.batch == 1 and set(one.mask_index[:, 0]) <= {0}
        assert len(one.masks) == int((raw.mask_index[:, 0] == b).sum())
        assert to_detections(one, 0, labels, thresholds, 64, 48) == to_detections(
            raw, b, labels, thresholds, 64, 48
        )
    assert raw.mask_index[:, 0].max() == 1  # the batch's own index is left alone
    with pytest.raises(IndexError):
        frame_outputs(raw, 2)


def test_masks_encoded_by_the_backend_are_used_as_they_are() -> None:
    """``mask_counts`` (the backend resized and encoded the masks): the detections carry those
    runs, the same as the host's from the logits; one frame's outputs keep their own runs; runs
    for another size are an error that names the detection."""
    import dataclasses

    from sam3stream.postprocess import _mask_counts, frame_outputs

    raw = _example()
    labels, thresholds = ["a", "b", "c"], [0.2, 0.4, 0.6]
    counts = tuple(_mask_counts(m, 64, 48) for m in raw.masks)
    encoded = dataclasses.replace(raw, masks=raw.masks[:, :0, :0], mask_counts=counts)
    for b in range(raw.batch):
        want = to_detections(raw, b, labels, thresholds, 64, 48)
        assert to_detections(encoded, b, labels, thresholds, 64, 48) == want
        assert to_detections(frame_outputs(encoded, b), 0, labels, thresholds, 64, 48) == want
    with pytest.raises(
        ValueError, match=r"mask of frame 0, class \d, query \d has 3072 pixels, expected 32x48"
    ):
        to_detections(encoded, 0, labels, thresholds, 64, 48, mask_size=(32, 48))
