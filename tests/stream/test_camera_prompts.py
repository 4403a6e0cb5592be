"""A camera's own classes, thresholds and zones; the other cameras keep the prompts' and have none."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from sam3stream.postprocess import to_detections
from sam3stream.runtime.fake import FakeBackend
from sam3stream.runtime.types import RawOutputs
from sam3stream.stream.frames import Detection, FrameResult
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
    assert {c.name: config.prompts.camera_thresholds(c) for c in config.cameras} == {
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
    # "strict" keeps queries down to 0.0, under the prompts' 0.05: the backend was asked for
    # their masks too.
    assert all(d.mask is not None for camera in ("people", "strict") for d in sink_detections(sink, camera))


def sink_detections(sink: MemorySink, camera: str) -> list[Detection]:
    return [d for r in sink.results[camera] for d in r.detections]


async def test_zones_reach_the_files_and_only_in_zones_drops_the_rest(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    # The fake engine's boxes are centred on the frame.
    middle = "[[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6]]"
    corner = "[[0, 0], [0.2, 0], [0.2, 0.2], [0, 0.2]]"
    zone = '[[cameras.zones]]\nname = "{}"\npolygon = {}\n'
    clip = video("same.mp4", frames=6)
    cameras = (
        camera_toml("tagged", clip)
        + zone.format("corner", corner)
        + zone.format("middle", middle)
        + camera_toml("fenced", video("wide.mp4", frames=6, width=80), only_in_zones=True)
        + zone.format("corner", corner)
        + camera_toml("plain", clip)
    )
    config = make_config(tmp_path, cameras, extra='[[sinks]]\ntype = "jsonl"\npath = "out"\n')
    keepable: dict[int, list[int]] = {}  # frame width -> rows that could be kept, per call

    def counting(raw: RawOutputs, b: int, labels: Any, thresholds: Any, width: int, *rest: Any) -> Any:
        keep = raw.scores[b] >= np.asarray(thresholds)[:, None]
        keepable.setdefault(width, []).append(int(keep.sum()))
        return to_detections(raw, b, labels, thresholds, width, *rest)

    async with Pipeline(config, backend=FakeBackend(), postprocess=counting) as p:
        await p.wait()

    def frames(camera: str) -> list[FrameResult]:
        lines = (tmp_path / "out" / f"{camera}.jsonl").read_bytes().splitlines()
        return [msgspec.json.decode(line, type=FrameResult) for line in lines]

    tagged, fenced, plain = frames("tagged"), frames("fenced"), frames("plain")
    assert len(tagged) == len(fenced) == len(plain) == 6
    assert all(r.detections for r in plain)
    for t, pl in zip(tagged, plain, strict=True):
        assert [d.box for d in t.detections] == [d.box for d in pl.detections]
        assert all(d.zones == ["middle"] for d in t.detections)
        assert all(d.zones == [] for d in pl.detections)
    assert all(r.detections == [] for r in fenced)
    # The fenced camera's queries outside its zone never reached the postprocessing as keepable,
    # so none of their masks was made.
    assert sorted(keepable) == [64, 80] and min(keepable[64]) > 0 and keepable[80] == [0] * 6
