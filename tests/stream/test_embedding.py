"""The embedding API inside the caller's own event loop: results, drain, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from sam3stream.runtime.fake import FakeBackend
from sam3stream.runtime.types import RawOutputs, TextFeatures
from sam3stream.stream.frames import FrameResult
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config, stub_postprocess


def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("decode-", "sam3-"))]


def looping_cameras(video: Callable[..., Path], n: int = 3) -> str:
    return "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=10), loop=True, fps=40) for i in range(n))


async def test_stop_drains_every_frame_read_exactly_once(tmp_path: Path, video: Callable[..., Path]) -> None:
    config = make_config(tmp_path, looping_cameras(video))
    sink = MemorySink()
    backend = FakeBackend(delay_s=0.01)
    async with Pipeline(config, backend=backend, sinks=[sink], postprocess=stub_postprocess) as p:
        await asyncio.sleep(1.0)
        await p.stop()
    assert p.drained is True
    for name, source in p.sources.items():
        # Looping keeps counting: seq runs past the file's 10 frames with no gap or repeat.
        assert source.seq > 10
        assert sink.seqs(name) == list(range(source.seq))
        # Every frame counted as decoded is accounted for: processed or dropped. A frame held back
        # for pacing when the camera stops was not due yet, so it is not counted.
        cam = p.metrics.snapshot()["cameras"][name]
        assert cam["frames_decoded"] == cam["frames_processed"] + cam["frames_dropped"] == source.seq
    assert backend.closed is False  # an injected backend stays the caller's to close
    assert not worker_threads()


async def test_results_iterator_and_cancelling_the_caller_leave_nothing_behind(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    config = make_config(tmp_path, looping_cameras(video))
    before = asyncio.all_tasks()
    got: list[FrameResult] = []
    enough = asyncio.Event()

    async def app() -> None:
        async with Pipeline(config, backend=FakeBackend(), postprocess=stub_postprocess) as p:
            async for result in p.results():
                got.append(result)
                if len(got) >= 20:
                    enough.set()

    task = asyncio.create_task(app())
    await asyncio.wait_for(enough.wait(), 10)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done and task.cancelled()
    assert asyncio.all_tasks() == before
    assert not worker_threads()
    per_camera: dict[str, list[int]] = {}
    for r in got:
        per_camera.setdefault(r.camera, []).append(r.seq)
    assert all(seqs == sorted(seqs) for seqs in per_camera.values())


async def test_unread_results_never_stall_the_pipeline(tmp_path: Path, video: Callable[..., Path]) -> None:
    cams = "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=30)) for i in range(2))
    config = make_config(tmp_path, cams)
    sink = MemorySink()
    pipeline = Pipeline(
        config, backend=FakeBackend(), sinks=[sink], postprocess=stub_postprocess, results_queue=5
    )
    async with pipeline as p:
        await asyncio.wait_for(p.wait(), 20)  # nobody reads p.results()
    assert sink.seqs("cam0") == list(range(30)) and sink.seqs("cam1") == list(range(30))
    assert p.results_dropped == 60 - 5
    kept = [r async for r in p.results()]  # what is left can still be read after the end
    assert len(kept) == 5


async def test_stop_is_bounded_by_the_drain_timeout(tmp_path: Path, video: Callable[..., Path]) -> None:
    config = make_config(tmp_path, looping_cameras(video), drain_timeout_s=0.5)
    slow = MemorySink("slow", delay_s=0.2)  # lossless and slow: results pile up in its queue
    async with Pipeline(config, backend=FakeBackend(), sinks=[slow], postprocess=stub_postprocess) as p:
        await asyncio.sleep(1.0)
        started = asyncio.get_running_loop().time()
        await p.stop()
        took = asyncio.get_running_loop().time() - started
    assert p.drained is False
    assert took < 0.5 + 3  # the drain bound, plus the sink's own bounded close
    assert slow.closed
    assert not worker_threads()


async def test_files_that_end_get_every_result_however_long_the_sinks_take(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    # Nobody asked to stop: the drain timeout does not apply, and a slow lossless sink gets all.
    cams = "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=12)) for i in range(2))
    config = make_config(tmp_path, cams, drain_timeout_s=0.2)
    slow = MemorySink("slow", delay_s=0.05)  # 24 results: about 1.2 s, six times the timeout
    async with Pipeline(config, backend=FakeBackend(), sinks=[slow], postprocess=stub_postprocess) as p:
        await asyncio.wait_for(p.wait(), 30)
    assert slow.seqs("cam0") == list(range(12)) and slow.seqs("cam1") == list(range(12))
    assert p.drained is True


async def test_a_stop_during_the_files_drain_is_bounded_by_the_timeout(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=12)) for i in range(2))
    config = make_config(tmp_path, cams, drain_timeout_s=0.3)
    stuck = MemorySink("stuck", delay_s=60)  # would hold the files' drain for minutes
    async with Pipeline(config, backend=FakeBackend(), sinks=[stuck], postprocess=stub_postprocess) as p:
        for name in p.sources:
            await asyncio.wait_for(stuck.wait_for_state(name, "ended"), 10)
        await asyncio.sleep(0.3)  # longer than the timeout: the files' drain is still waiting
        loop = asyncio.get_running_loop()
        started = loop.time()
        await p.stop()
        took = loop.time() - started
    assert p.drained is False
    assert took < 0.3 + 3  # the drain bound, plus the sink's own bounded close
    assert not worker_threads()


async def test_cancelled_while_starting_leaves_nothing_behind(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    config = make_config(tmp_path, looping_cameras(video, 1))
    before = asyncio.all_tasks()
    starting = asyncio.Event()

    class SlowToStart(MemorySink):
        async def start(self) -> None:
            starting.set()
            await asyncio.sleep(30)

    entered = False

    async def app() -> None:
        nonlocal entered
        async with Pipeline(
            config, backend=FakeBackend(), sinks=[SlowToStart()], postprocess=stub_postprocess
        ):
            entered = True

    task = asyncio.create_task(app())
    await asyncio.wait_for(starting.wait(), 10)
    task.cancel()
    await asyncio.wait({task}, timeout=10)
    assert task.cancelled() and not entered
    assert asyncio.all_tasks() == before
    assert not worker_threads()


async def test_stop_while_the_engine_loads_returns_and_closes_it_once_loaded(
    tmp_path: Path, video: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load cannot be interrupted: a stop during it returns without waiting for it, and the
    backend it makes afterwards is closed on its thread instead of leaking."""
    import sam3stream.stream.pipeline as pipeline_module

    release, loading = threading.Event(), threading.Event()
    made: list[FakeBackend] = []

    def slow_open(*args: object, **kwargs: object) -> FakeBackend:
        loading.set()
        release.wait(30)
        made.append(FakeBackend())
        return made[-1]

    monkeypatch.setattr(pipeline_module, "open_backend", slow_open)
    config = make_config(tmp_path, looping_cameras(video, 1))
    p = Pipeline(config, postprocess=stub_postprocess)
    starting = asyncio.create_task(p.start())
    await asyncio.wait_for(asyncio.to_thread(loading.wait, 10), 15)
    p.request_stop()
    # Returns while the load is still blocked (it would wait 30 s otherwise).
    await asyncio.wait_for(asyncio.wait({starting}), 10)
    await asyncio.wait_for(p.wait(), 10)
    assert not made
    release.set()
    for _ in range(200):
        if made and made[0].closed:
            break
        await asyncio.sleep(0.05)
    assert made and made[0].closed


@pytest.mark.parametrize(("cameras", "max_batch", "typical"), [(3, 8, 3), (3, 2, 2), (1, 4, 1)])
async def test_the_engine_is_told_how_many_frames_a_batch_usually_holds(
    tmp_path: Path,
    video: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    cameras: int,
    max_batch: int,
    typical: int,
) -> None:
    """One frame per camera per round: fewer cameras than max_batch mean batches of that many
    frames, and the torch backend sizes its vision steps for them (no padding frames). It is
    also given engines.compile_cache (on unless the config turns it off)."""
    import msgspec

    import sam3stream.stream.pipeline as pipeline_module

    asked: list[object] = []

    def recording_open(*args: object, **kwargs: object) -> FakeBackend:
        asked.append((kwargs.get("typical_batch"), kwargs.get("compile_cache")))
        return FakeBackend()

    monkeypatch.setattr(pipeline_module, "open_backend", recording_open)
    config = make_config(tmp_path, looping_cameras(video, cameras), max_batch=max_batch)
    no_cache = msgspec.structs.replace(config.engines, compile_cache=False)
    for run in (config, msgspec.structs.replace(config, engines=no_cache)):
        async with Pipeline(run, postprocess=stub_postprocess) as p:
            p.request_stop()
    assert asked == [(typical, True), (typical, False)]


class WarmingBackend(FakeBackend):
    """A backend that compiles on first use: the pipeline warms it before any camera starts."""

    def __init__(self, pipeline: list[Pipeline], release: threading.Event | None = None) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.release = release
        self.warming = threading.Event()
        self.events: list[tuple[str, object]] = []

    def warm_up(self, text: TextFeatures) -> float:
        self.events.append(("warm_up", (text.features.shape[0], dict(self.pipeline[0].sources))))
        self.warming.set()
        if self.release is not None:
            self.release.wait(30)
        return 0.0

    def infer(self, frames: npt.NDArray[np.uint8], text: TextFeatures, min_score: float) -> RawOutputs:
        self.events.append(("infer", len(frames)))
        return super().infer(frames, text, min_score)


async def test_the_engine_is_warmed_up_with_the_prompts_before_any_camera_starts(
    tmp_path: Path, video: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sam3stream.stream.pipeline as pipeline_module

    made: list[Pipeline] = []
    backend = WarmingBackend(made)
    monkeypatch.setattr(pipeline_module, "open_backend", lambda *a, **k: backend)
    sink = MemorySink()
    config = make_config(tmp_path, looping_cameras(video, 2))
    made.append(Pipeline(config, sinks=[sink], postprocess=stub_postprocess))
    async with made[0] as p:
        await asyncio.wait_for(sink.wait_for("cam0"), 20)
        p.request_stop()
    kind, (classes, sources) = backend.events[0]
    assert kind == "warm_up" and classes == 2 and sources == {}  # the config's two classes, no camera yet
    assert [kind for kind, _ in backend.events[1:]] == ["infer"] * (len(backend.events) - 1)
    assert len(backend.events) > 1


async def test_stop_while_the_engine_warms_up_returns_and_closes_it_after(
    tmp_path: Path, video: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sam3stream.stream.pipeline as pipeline_module

    release = threading.Event()
    made: list[Pipeline] = []
    backend = WarmingBackend(made, release)
    monkeypatch.setattr(pipeline_module, "open_backend", lambda *a, **k: backend)
    made.append(Pipeline(make_config(tmp_path, looping_cameras(video, 1)), postprocess=stub_postprocess))
    p = made[0]
    starting = asyncio.create_task(p.start())
    await asyncio.wait_for(asyncio.to_thread(backend.warming.wait, 10), 15)
    p.request_stop()
    await asyncio.wait_for(asyncio.wait({starting}), 10)  # not the 30 s the warm-up would take
    await asyncio.wait_for(p.wait(), 10)
    assert not backend.closed
    release.set()
    for _ in range(200):
        if backend.closed:
            break
        await asyncio.sleep(0.05)
    assert backend.closed and [kind for kind, _ in backend.events] == ["warm_up"]


async def test_a_batch_is_postprocessed_on_several_threads_and_published_in_order(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    """Masks cost milliseconds each on the host: a batch's frames are spread over post_threads,
    and every camera still gets every frame once, in order."""
    names: set[str] = set()
    lock = threading.Lock()

    def slow_postprocess(*args: Any) -> list[Any]:
        with lock:
            names.add(threading.current_thread().name)
        time.sleep(0.01)  # a few masks' worth of numpy
        return stub_postprocess(*args)

    sink = MemorySink()
    cams = "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=12)) for i in range(4))
    config = make_config(tmp_path, cams, max_batch=4)
    async with Pipeline(
        config, backend=FakeBackend(), sinks=[sink], postprocess=slow_postprocess, post_threads=2
    ) as p:
        await asyncio.wait_for(p.wait(), 60)
    for i in range(4):
        assert sink.seqs(f"cam{i}") == list(range(12))
    assert len({n for n in names if n.startswith("sam3-post-frame")}) == 2
    assert not worker_threads()


@pytest.mark.parametrize(("cores", "threads"), [(None, None), (0, 1), (2, 1), (8, 2), (16, 4), (128, 4)])
def test_postprocessing_threads_take_a_quarter_of_the_cores(cores: int | None, threads: int | None) -> None:
    from sam3stream.stream.worker import default_post_threads

    if cores is None:
        assert 1 <= default_post_threads() <= 4
    else:
        assert default_post_threads(cores) == threads


def test_post_threads_below_one_is_refused_before_anything_loads(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    config = make_config(tmp_path, looping_cameras(video, 1))
    with pytest.raises(ValueError, match="post_threads must be >= 1, got 0"):
        Pipeline(config, postprocess=stub_postprocess, post_threads=0)


async def test_a_second_reader_of_results_is_refused(tmp_path: Path, video: Callable[..., Path]) -> None:
    config = make_config(tmp_path, looping_cameras(video, n=1))
    async with Pipeline(config, backend=FakeBackend(), postprocess=stub_postprocess) as p:
        first = p.results()
        await anext(first)
        with pytest.raises(RuntimeError, match="already has a reader"):
            await anext(p.results())
        await first.aclose()
        second = p.results()  # once the first reader is done, another may read
        assert (await anext(second)).camera == "cam0"
        await second.aclose()
        await p.stop()


async def test_embedded_logs_go_through_the_applications_logging(
    tmp_path: Path,
    video: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    import structlog

    structlog.reset_defaults()  # an application that has not set structlog up
    caplog.set_level(logging.INFO, logger="sam3stream")
    cams = camera_toml("good", video("good.mp4", frames=4)) + camera_toml("gone", tmp_path / "gone.mp4")
    config = make_config(tmp_path, cams)
    async with Pipeline(config, backend=FakeBackend(), postprocess=stub_postprocess) as p:
        await p.wait()
    seen = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert any(
        name == "sam3stream.stream.source" and level == logging.ERROR and "camera=gone" in message
        for name, level, message in seen
        if message.startswith("camera_failed")
    )
    assert any(message.startswith("pipeline_started") for _, _, message in seen)
    assert capsys.readouterr().out == ""  # nothing printed behind the application's back
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="sam3stream")  # the application's level applies
    async with Pipeline(config, backend=FakeBackend(), postprocess=stub_postprocess) as p:
        await p.wait()
    assert caplog.records and all(r.levelno >= logging.WARNING for r in caplog.records)


async def test_a_drain_cut_short_but_made_good_by_the_sinks_close_counts_as_drained(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    config = make_config(tmp_path, camera_toml("cam0", video("c0.mp4", frames=8)), drain_timeout_s=0.3)
    slow = MemorySink("slow", delay_s=0.1)  # what it holds outlasts the drain, not its close (1 s)
    async with Pipeline(config, backend=FakeBackend(), sinks=[slow], postprocess=stub_postprocess) as p:
        await asyncio.wait_for(slow.wait_for("cam0", 1), 10)
        await asyncio.wait_for(p.in_flight.wait_idle(), 10)  # all results made; the sink is behind
        await p.stop()
    delivered = slow.seqs("cam0")
    assert len(delivered) >= 4 and delivered == list(range(len(delivered)))
    assert p.drained is True


async def test_sink_folders_that_cannot_be_written_fail_before_the_engine_loads(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    from sam3stream.errors import Sam3StreamError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    sinks = (
        f'\n[[sinks]]\ntype = "jsonl"\npath = "{blocker / "jsonl"}"\n'
        f'\n[[sinks]]\ntype = "video"\ndir = "{blocker / "video"}"\n'
    )
    config = make_config(tmp_path, camera_toml("cam0", video("c0.mp4", frames=4)), extra=sinks)
    opened: list[str] = []

    class Opening(Pipeline):
        async def _open_backend(self, *args: Any) -> Any:
            opened.append("engine")
            return await super()._open_backend(*args)

    with pytest.raises(Sam3StreamError) as info:
        async with Opening(config, postprocess=stub_postprocess):
            pass
    message = str(info.value)
    assert f"sink 'jsonl-0' (sinks[0].path) cannot write in {blocker / 'jsonl'}" in message
    assert f"sink 'video-1' (sinks[1].dir) cannot write in {blocker / 'video'}" in message
    assert opened == []  # nothing slow was started first
