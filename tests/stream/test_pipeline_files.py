"""File cameras end to end with the fake backend: every frame once, in order."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from sam3stream.runtime.fake import FakeBackend
from sam3stream.runtime.types import RawOutputs, TextFeatures
from sam3stream.stream.frames import FrameResult
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config, stub_postprocess
from tests.stream.videos import gray_level


async def test_eight_file_cameras_every_frame_once_in_order(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    counts = [10 + i for i in range(8)]
    cams = "".join(camera_toml(f"cam{i}", video(f"cam{i}.mp4", frames=n)) for i, n in enumerate(counts))
    config = make_config(tmp_path, cams, max_batch=8)
    sink = MemorySink()
    backend = FakeBackend(batch=8)
    # The real postprocess: boxes in pixels, COCO RLE masks at the frame's own size.
    async with Pipeline(config, backend=backend, sinks=[sink]) as p:
        seen: dict[str, list[int]] = {}
        async for result in p.results():
            seen.setdefault(result.camera, []).append(result.seq)
    for i, n in enumerate(counts):
        assert sink.seqs(f"cam{i}") == list(range(n))
        assert seen[f"cam{i}"] == list(range(n))
    assert p.camera_states() == {f"cam{i}": "ended" for i in range(8)}
    assert sink.started and sink.closed
    assert backend.infer_threads == 1
    assert max(backend.batch_sizes) <= 8
    # The fake scores a frame by its brightness: results belong to their own frames.
    first = sink.results["cam0"][3]
    assert abs(first.detections[0].score - gray_level(3) / 255) < 0.03
    assert first.width == 64 and first.height == 48
    mask = first.detections[0].mask
    assert mask is not None and tuple(mask.size) == (48, 64)
    assert first.timing.batch_size >= 1 and first.timing.end_to_end > 0
    assert not [t for t in threading.enumerate() if t.name.startswith(("decode-", "sam3-"))]
    assert asyncio.current_task() is not None


class ImageSink(MemorySink):
    wants_images = True

    def __init__(self) -> None:
        super().__init__("images")
        self.shapes: list[tuple[str, tuple[int, ...] | None]] = []

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None:
        self.shapes.append((result.camera, None if image is None else image.shape))
        await super().publish(result, image)


async def test_full_size_images_reach_only_sinks_that_draw(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = camera_toml("a", video("a.mp4", frames=5, width=160, height=120))
    drawing, plain = ImageSink(), MemorySink("plain")
    config = make_config(tmp_path, cams)
    async with Pipeline(config, backend=FakeBackend(), sinks=[drawing, plain]) as p:
        await p.wait()
    assert drawing.shapes == [("a", (120, 160, 3))] * 5
    assert plain.seqs("a") == list(range(5))


class SubmittingFake(FakeBackend):
    """Like a GPU backend: ``submit`` queues a batch, ``result()`` waits for it."""

    def __init__(self) -> None:
        super().__init__(delay_s=0.005)
        self.submitted: list[int] = []
        self.waited: list[int] = []
        self.events: list[tuple[str, int]] = []

    def submit(self, frames: npt.NDArray[np.uint8], text: TextFeatures, min_score: float) -> _Pending:
        n = len(self.submitted)
        self.submitted.append(n)
        self.events.append(("submit", n))

        def finish() -> RawOutputs:
            # The previous batch is always waited for first: results leave in order.
            assert self.waited == list(range(n))
            self.waited.append(n)
            self.events.append(("wait", n))
            return self.infer(frames, text, min_score)

        return _Pending(finish)


class _Pending:
    def __init__(self, finish: Callable[[], RawOutputs]) -> None:
        self.result = finish


async def test_backends_that_submit_get_the_next_batch_before_the_last_is_waited_for(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=15)) for i in range(4))
    sink = MemorySink()
    backend = SubmittingFake()
    config = make_config(tmp_path, cams, max_batch=2)
    async with Pipeline(config, backend=backend, sinks=[sink], postprocess=stub_postprocess) as p:
        await p.wait()
    for i in range(4):
        assert sink.seqs(f"cam{i}") == list(range(15))
    assert backend.waited == backend.submitted and len(backend.submitted) >= 30
    # Under load the next batch was queued before the previous one was waited for.
    ev = backend.events
    assert any(ev.index(("submit", n + 1)) < ev.index(("wait", n)) for n in range(len(backend.submitted) - 1))


async def test_a_restart_appends_results_that_the_run_id_tells_apart(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = camera_toml("cam0", video("cam0.mp4", frames=6))
    config = make_config(tmp_path, cams, extra='[[sinks]]\ntype = "jsonl"\npath = "out"\n')
    runs = []
    for _ in range(2):  # the same config started twice: the JSONL file continues
        async with Pipeline(config, backend=FakeBackend(), postprocess=stub_postprocess) as p:
            await p.wait()
        runs.append(p.run_id)
    lines = [json.loads(line) for line in (tmp_path / "out" / "cam0.jsonl").read_text().splitlines()]
    assert [line["seq"] for line in lines] == list(range(6)) * 2  # seq alone repeats
    assert [line["run"] for line in lines] == [runs[0]] * 6 + [runs[1]] * 6
    assert runs[0] != runs[1] and all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", run) for run in runs)
