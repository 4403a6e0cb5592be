"""Broken inputs, failing sinks and a dying engine: each contained to where it belongs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import pytest

from sam3stream.errors import EngineDeadError, PostprocessError
from sam3stream.runtime.fake import FakeBackend
from sam3stream.runtime.types import RawOutputs
from sam3stream.stream.frames import Detection
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config, stub_postprocess
from tests.stream.videos import gray_level


def decodable_frames(path: Path) -> int:
    """How many frames plain PyAV gets out of a file, skipping packets it cannot decode."""
    n = 0
    with av.open(str(path)) as container:
        for packet in container.demux(video=0):
            try:
                n += len(packet.decode())
            except av.error.InvalidDataError:
                continue
    return n


def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("decode-", "sam3-"))]


async def test_broken_files_end_their_camera_only(tmp_path: Path, video: Callable[..., Path]) -> None:
    good = video("good.mp4", frames=20)
    short = video("short.mp4", frames=3)  # ends while the others still run (they are paced)
    whole = video("whole.mp4", frames=30)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 500)
    missing = tmp_path / "missing.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cams = (
        camera_toml("good", good, fps=50)
        + camera_toml("short", short)
        + camera_toml("truncated", truncated)
        + camera_toml("corrupt", corrupt)
        + camera_toml("missing", missing)
        + camera_toml("empty", empty)
    )
    sink = MemorySink()
    config = make_config(tmp_path, cams)
    async with Pipeline(config, backend=FakeBackend(), sinks=[sink], postprocess=stub_postprocess) as p:
        await p.wait()

    assert sink.seqs("good") == list(range(20))
    assert sink.seqs("short") == list(range(3))
    expected = decodable_frames(truncated)
    assert 0 < expected < 30
    assert sink.seqs("truncated") == list(range(expected))
    assert sink.seqs("corrupt") == sink.seqs("missing") == sink.seqs("empty") == []
    # A file that could not be read is "failed", not "ended" like one read to its end.
    assert p.camera_states() == {
        **dict.fromkeys(["good", "short", "truncated"], "ended"),
        **dict.fromkeys(["corrupt", "missing", "empty"], "failed"),
    }
    errors = p.camera_errors()
    # Each says why in words and names its file; FFmpeg's errno numbers stay out.
    assert errors == {
        "corrupt": "cannot open: not a video FFmpeg can read (Invalid data found when processing input): "
        f"{corrupt}",
        "missing": f"cannot open: No such file or directory: {missing}",
        "empty": f"cannot open: the file is empty: {empty}",
    }
    assert ("missing", "failed", errors["missing"]) in sink.states  # status goes out to sinks too
    assert not worker_threads()


async def test_a_failing_sink_does_not_stop_the_others(tmp_path: Path, video: Callable[..., Path]) -> None:
    cams = camera_toml("a", video("a.mp4", frames=15)) + camera_toml("b", video("b.mp4", frames=12))
    bad = MemorySink("bad", fail_every=2)
    good = MemorySink("good")
    config = make_config(tmp_path, cams)
    async with Pipeline(config, backend=FakeBackend(), sinks=[bad, good], postprocess=stub_postprocess) as p:
        await p.wait()
    assert good.seqs("a") == list(range(15)) and good.seqs("b") == list(range(12))
    assert bad.calls == 27
    assert p.metrics.snapshot()["sinks"]["bad"]["errors"] == 27 // 2
    assert bad.closed and good.closed


async def test_engine_death_stops_everything_loudly(tmp_path: Path, video: Callable[..., Path]) -> None:
    cams = camera_toml("a", video("a.mp4", frames=30), loop=True) + camera_toml(
        "b", video("b.mp4", frames=30), loop=True
    )
    config = make_config(tmp_path, cams, max_batch=2)
    backend = FakeBackend(fail_after=3)
    sink = MemorySink()
    before = asyncio.all_tasks()
    with pytest.raises(EngineDeadError, match="inference failed"):
        async with Pipeline(config, backend=backend, sinks=[sink], postprocess=stub_postprocess) as p:
            async for _ in p.results():
                pass
    assert asyncio.all_tasks() == before
    assert sink.closed
    assert sum(len(v) for v in sink.results.values()) <= 3 * 2  # at most the batches before the failure
    assert not worker_threads()
    # wait() keeps reporting the failure: nothing looks alive afterwards.
    with pytest.raises(EngineDeadError):
        await p.wait()


async def test_a_postprocessing_failure_stops_everything_naming_the_camera_and_frame(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = camera_toml("a", video("a.mp4", frames=30)) + camera_toml("b", video("b.mp4", frames=30, width=80))
    config = make_config(tmp_path, cams, max_batch=2)
    calls_for_b = 0

    def postprocess(raw: RawOutputs, b: int, *rest: Any) -> list[Detection]:
        nonlocal calls_for_b
        if rest[2] == 80:  # camera b's frames (its width)
            calls_for_b += 1
            if calls_for_b == 3:
                raise IndexError("a bug in postprocessing")
        return stub_postprocess(raw, b, *rest)

    sink = MemorySink()
    with pytest.raises(PostprocessError, match=r"frame 2 of camera 'b' failed: IndexError\('a bug"):
        async with Pipeline(config, backend=FakeBackend(), sinks=[sink], postprocess=postprocess) as p:
            await p.wait()
    assert sink.closed
    assert sink.seqs("b") == [0, 1]  # what came before the failure was delivered, in order


def fails_on_frame_2(raw: RawOutputs, b: int, *rest: Any) -> list[Detection]:
    """The stand-in postprocess, failing on the frame painted gray_level(2) (the fake engine's
    best score is the frame's brightness). At module level, so that processes can run it."""
    if round((float(raw.scores[b, 0, 0]) * 255 - gray_level(0)) / 8) == 2:
        raise IndexError("a bug in postprocessing")
    return stub_postprocess(raw, b, *rest)


@pytest.mark.parametrize("where", [{"post_threads": 1}, {"post_threads": 3}, {"post_processes": 2}])
async def test_the_frames_before_a_failure_in_its_batch_are_delivered(
    tmp_path: Path, video: Callable[..., Path], where: dict[str, int]
) -> None:
    # One batch holds frames 0-3 (the batcher waits for it to fill): a failure on frame 2
    # used to take frames 0 and 1 down with it.
    config = make_config(tmp_path, camera_toml("a", video("a.mp4", frames=6)), max_batch=4, max_wait_ms=2000)
    sink = MemorySink()
    with pytest.raises(PostprocessError, match=r"frame 2 of camera 'a' failed: IndexError\('a bug"):
        async with Pipeline(
            config, backend=FakeBackend(), sinks=[sink], postprocess=fails_on_frame_2, **where
        ) as p:
            await p.wait()
    assert sink.seqs("a") == [0, 1]
    assert p.metrics.snapshot()["cameras"]["a"]["frames_processed"] == 2


async def test_engine_death_still_delivers_what_was_computed(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    """Results computed before the engine died but still queued for a slow lossless sink reach
    it before it closes; a lossy sink's leftovers are counted as dropped, not lost silently."""
    cams = camera_toml("a", video("a.mp4", frames=30), loop=True) + camera_toml(
        "b", video("b.mp4", frames=30), loop=True
    )
    config = make_config(tmp_path, cams, max_batch=2)
    slow = MemorySink("slow", delay_s=0.05)
    lossy = MemorySink("lossy", lossless=False, delay_s=10.0)
    p = Pipeline(config, backend=FakeBackend(fail_after=4), sinks=[slow, lossy], postprocess=stub_postprocess)
    with pytest.raises(EngineDeadError):
        async with p:
            await p.wait()
    processed = sum(c["frames_processed"] for c in p.metrics.snapshot()["cameras"].values())
    assert processed >= 4
    assert sum(len(v) for v in slow.results.values()) == processed
    assert slow.closed and lossy.closed
    lossy_route = next(r for r in p.routes if r.name == "lossy")
    # The lossy sink was stuck on its first result: nothing reached it, and all of it is counted.
    assert not lossy.results
    assert lossy_route.dropped == processed
