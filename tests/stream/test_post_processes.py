"""Postprocessing in processes ([postprocess] processes = N): the same detections as in the
pipeline's own threads, every frame once and in order, and a dead process costs no frame."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sam3stream.errors import ConfigError
from sam3stream.runtime.fake import FakeBackend
from sam3stream.runtime.types import RawOutputs
from sam3stream.stream.frames import Detection
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config, stub_postprocess

_PARENT = "SAM3STREAM_TEST_PARENT_PID"


def labelled_by_process(*args: Any) -> list[Detection]:
    """The stub's detections, each labelled with the id of the process that made it."""
    return [
        Detection(label=str(os.getpid()), score=d.score, box=d.box, box_px=d.box_px)
        for d in stub_postprocess(*args)
    ]


def dies_outside_the_parent(*args: Any) -> list[Detection]:
    """Kills the process it runs in, unless that is the test's own."""
    if str(os.getpid()) != os.environ[_PARENT]:
        os._exit(3)
    return labelled_by_process(*args)


def cameras(video: Callable[..., Path], n: int = 4, frames: int = 10) -> str:
    return "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=frames)) for i in range(n))


async def run(config_extra: str, tmp_path: Path, video: Callable[..., Path], **kwargs: object) -> MemorySink:
    config = make_config(tmp_path, cameras(video), extra=config_extra)
    sink = MemorySink()
    async with Pipeline(config, backend=FakeBackend(), sinks=[sink], **kwargs) as p:  # type: ignore[arg-type]
        await asyncio.wait_for(p.wait(), 120)
    return sink


async def test_processes_give_the_threads_detections_masks_included(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    """The real postprocessing (masks resized and encoded) in 2 processes, each sent only its
    frame's outputs: every frame once, in order, with the detections the in-process path gives."""
    here = await run("", tmp_path, video, post_threads=1)
    there = await run("[postprocess]\nprocesses = 2\n", tmp_path, video)
    for i in range(4):
        assert there.seqs(f"cam{i}") == list(range(10))
        mine = [r.detections for r in here.results[f"cam{i}"]]
        theirs = [r.detections for r in there.results[f"cam{i}"]]
        assert theirs == mine
        assert any(d.mask is not None for ds in theirs for d in ds)  # masks did cross


async def test_the_work_runs_in_other_processes(tmp_path: Path, video: Callable[..., Path]) -> None:
    sink = await run("", tmp_path, video, postprocess=labelled_by_process, post_processes=2)
    pids = {d.label for results in sink.results.values() for r in results for d in r.detections}
    assert pids and str(os.getpid()) not in pids


async def test_a_dead_process_costs_no_frame(
    tmp_path: Path, video: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch sent to the processes kills one; that batch and the rest are
    postprocessed in the pipeline's own process, and every frame still arrives once."""
    monkeypatch.setenv(_PARENT, str(os.getpid()))
    sink = await run("", tmp_path, video, postprocess=dies_outside_the_parent, post_processes=2)
    for i in range(4):
        assert sink.seqs(f"cam{i}") == list(range(10))
    pids = {d.label for results in sink.results.values() for r in results for d in r.detections}
    assert pids == {str(os.getpid())}


def test_a_postprocess_that_cannot_be_sent_is_refused_up_front(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    config = make_config(tmp_path, cameras(video, 1))
    with pytest.raises(ValueError, match="post_processes needs a postprocess function defined at a module"):
        Pipeline(config, postprocess=lambda *a: [], post_processes=2)


@pytest.mark.parametrize(("line", "key"), [("processes = -1", "processes"), ("threads = 0", "threads")])
def test_bad_postprocess_counts_name_the_key(
    tmp_path: Path, video: Callable[..., Path], line: str, key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"postprocess\.{key}"):
        make_config(tmp_path, cameras(video, 1), extra=f"[postprocess]\n{line}\n")


def test_negative_post_processes_is_refused_when_the_pipeline_is_made(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    with pytest.raises(ValueError, match="post_processes must be >= 0, got -1"):
        Pipeline(make_config(tmp_path, cameras(video, 1)), post_processes=-1)


async def test_ctrl_c_leaves_the_processes_to_the_pipeline(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    """Ctrl-C reaches the whole process group; the processes ignore it (the pipeline decides
    how to stop), so work goes on in them rather than breaking the pool; the stop that follows
    drains every frame read."""
    import multiprocessing
    import signal

    loops = "".join(
        camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=10), loop=True, fps=40) for i in range(2)
    )
    config = make_config(tmp_path, loops)
    sink = MemorySink()
    earlier = {c.pid for c in multiprocessing.active_children()}  # an earlier test's, still exiting
    async with Pipeline(
        config, backend=FakeBackend(), sinks=[sink], postprocess=labelled_by_process, post_processes=2
    ) as p:
        await asyncio.wait_for(sink.wait_for("cam0", 5), 60)
        children = [c for c in multiprocessing.active_children() if c.pid not in earlier]
        assert len(children) == 2
        for child in children:
            assert child.pid is not None
            os.kill(child.pid, signal.SIGINT)
        seen = len(sink.results["cam0"])
        await asyncio.wait_for(sink.wait_for("cam0", seen + 10), 60)
        assert all(child.is_alive() for child in children)
        await p.stop()
    assert p.drained is True
    for name, source in p.sources.items():  # stopped mid-stream: every frame read, once, in order
        assert sink.seqs(name) == list(range(source.seq))
    late = sink.results["cam0"][seen:]
    pids = {d.label for r in late for d in r.detections}
    assert pids and str(os.getpid()) not in pids  # still postprocessed in the processes


class _NoMasks(FakeBackend):
    """The fake's detections with no mask crossing from the device (rows below min_score, or a
    backend asked for none)."""

    def infer(self, frames: Any, text: Any, min_score: float) -> RawOutputs:
        out = super().infer(frames, text, min_score)
        return dataclasses.replace(out, masks=out.masks[:0], mask_index=out.mask_index[:0])


async def test_frames_without_masks_skip_the_round_trip(tmp_path: Path, video: Callable[..., Path]) -> None:
    """Detections without masks cost microseconds: sending them to a process would cost more."""
    config = make_config(tmp_path, cameras(video))
    sink = MemorySink()
    async with Pipeline(
        config, backend=_NoMasks(), sinks=[sink], postprocess=labelled_by_process, post_processes=2
    ) as p:
        await asyncio.wait_for(p.wait(), 120)
    pids = {d.label for results in sink.results.values() for r in results for d in r.detections}
    assert pids == {str(os.getpid())}
    assert all(sink.seqs(f"cam{i}") == list(range(10)) for i in range(4))


def dies_at_start() -> None:
    os._exit(3)


async def test_processes_that_cannot_start_leave_the_work_here(
    tmp_path: Path, video: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes that die as they start (a program that re-runs itself on import, say) leave
    the pipeline postprocessing in its own process: every frame arrives."""
    from sam3stream.stream import worker

    monkeypatch.setattr(worker, "_ignore_interrupts", dies_at_start)
    sink = await run("", tmp_path, video, postprocess=labelled_by_process, post_processes=2)
    pids = {d.label for results in sink.results.values() for r in results for d in r.detections}
    assert pids == {str(os.getpid())}
    assert all(sink.seqs(f"cam{i}") == list(range(10)) for i in range(4))
