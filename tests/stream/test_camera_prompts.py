"""A camera reports its own classes at its own thresholds; the others keep the prompts'."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from sam3stream.runtime.fake import FakeBackend
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config


async def test_each_camera_reports_its_classes_at_its_thresholds(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    clip = video("same.mp4", frames=8)  # one clip for every camera: the same scores everywhere
    cameras = (
        camera_toml("every", clip)
        + camera_toml("people", clip)
        + 'classes = ["person"]\n'
        + camera_toml("strict", clip)
        + "thresholds = { hand = 1.0, person = 0.0 }\n"
    )
    config = make_config(tmp_path, cameras)
    assert config.camera_thresholds() == {
        "every": [0.05, 0.05],
        "people": [0.05, math.inf],
        "strict": [0.0, 1.0],
    }
    sink = MemorySink()
    # The real postprocess (masks included), not the stand-in: it is what reads the thresholds.
    async with Pipeline(config, backend=FakeBackend(), sinks=[sink]) as p:
        await p.wait()

    def labels(camera: str) -> list[list[str]]:
        return [[d.label for d in r.detections] for r in sink.results[camera]]

    every, people, strict = labels("every"), labels("people"), labels("strict")
    assert len(every) == len(people) == len(strict) == 8
    assert any("hand" in frame for frame in every)  # the clip does give hands at 0.05
    for e, pe, st in zip(every, people, strict, strict=True):
        assert pe == [label for label in e if label == "person"]
        assert "hand" not in st and st.count("person") >= e.count("person")  # 0.0 keeps every query
    assert all(d.mask is not None for r in sink.results["people"] for d in r.detections)
