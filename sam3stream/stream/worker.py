"""GpuWorker: owns the backend, turns batches of frames into FrameResults.

Two stages, each on its own single thread, linked by a one-slot handoff so that
postprocessing batch N overlaps inference of batch N+1 while results still
leave in batch order (the post thread spreads a batch's frames over
``post_threads`` threads where the machine has cores to spare, or over
``post_processes`` processes, which escape Python's lock: each kept detection's
mask costs milliseconds of numpy on the host, unless the backend encoded it on
the device):

    batches -> [infer thread] stack, backend.submit|infer -> handoff -> [post thread] detections -> publish

A backend with ``submit(frames, text, min_score) -> pending`` (``pending.result()``
waits) gets batch n+1 queued before batch n is waited for, so the device is
never idle between batches; ``infer`` is the fallback.

The backend is only ever called from the infer thread (backends are not
thread-safe). Any exception from the backend means the engine is dead: it is
raised as EngineDeadError and the pipeline stops, rather than carrying on with
an engine in an unknown state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import math
import multiprocessing
import os
import pickle
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.config import CameraConfig, PromptsConfig
from sam3stream.errors import EngineDeadError, PostprocessError
from sam3stream.metrics import Metrics
from sam3stream.runtime.types import Backend, RawOutputs, TextFeatures
from sam3stream.stream.batch_queue import BatchQueue
from sam3stream.stream.batcher import Batch
from sam3stream.stream.frames import Detection, Frame, FrameResult, StageTimes
from sam3stream.stream.mailbox import InFlight
from sam3stream.stream.tasks import first_error
from sam3stream.stream.threads import close_executor, in_background, single_thread
from sam3stream.zones import CameraZones

__all__ = ["GpuWorker", "Postprocess", "Publish"]

log = structlog.get_logger(__name__)

# to_detections(raw, b, labels, thresholds, width, height, mask_size) -> detections of frame b
Postprocess = Callable[
    [RawOutputs, int, Sequence[str], Sequence[float], int, int, tuple[int, int] | None], list[Detection]
]
# publish(result, original image or None)
Publish = Callable[[FrameResult, npt.NDArray[np.uint8] | None], Awaitable[None]]

_T = TypeVar("_T")
_THREAD_CLOSE_S = 30.0  # an engine call cannot be interrupted: let the one in flight finish


def _identity(raw: RawOutputs) -> RawOutputs:
    return raw


def post_threads_or_default(post_threads: int | None) -> int:
    """``post_threads`` checked, or the default when None."""
    if post_threads is None:
        return default_post_threads()
    if post_threads < 1:
        raise ValueError(f"post_threads must be >= 1, got {post_threads}")
    return post_threads


def _ignore_interrupts() -> None:
    """In a postprocessing process: Ctrl-C reaches the whole process group, and the pipeline
    (the parent) decides how to stop; a child that died of it would only print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_post_processes(post_processes: int, postprocess: Postprocess | None) -> None:
    """``post_processes`` must be >= 0, and with processes the postprocess function must be one
    that a process can be sent (defined at a module's top level)."""
    if post_processes < 0:
        raise ValueError(f"post_processes must be >= 0, got {post_processes}")
    if post_processes and postprocess is not None:
        try:
            pickle.dumps(postprocess)
        except Exception as exc:
            raise ValueError(
                "post_processes needs a postprocess function defined at a module's top level "
                f"(processes are sent it by name): {exc}"
            ) from None


def default_post_threads(cores: int | None = None) -> int:
    """Threads for a batch's postprocessing: a quarter of the cores, 1 to 4. The rest are for the
    cameras' decoding, the event loop and the engine thread; numpy holds the GIL for part of
    the mask work, so more threads than that gain little (2 threads: 1.35x on 2 cores)."""
    cores = os.cpu_count() if cores is None else cores
    return max(1, min(4, (cores or 1) // 4))


def default_postprocess() -> Postprocess:
    module = importlib.import_module("sam3stream.postprocess")
    fn: Postprocess = module.to_detections
    return fn


@dataclass(slots=True)
class _Submitted:
    batch: Batch
    started: float  # monotonic, when the engine thread picked the batch up
    preprocess_ms: float
    submitted: float  # perf_counter, when the engine call began
    finish: Callable[[], RawOutputs]  # waits for the engine and returns its outputs


@dataclass(slots=True)
class _Inferred:
    batch: Batch
    raw: RawOutputs
    started: float  # monotonic, when the infer thread picked the batch up
    preprocess_ms: float
    vision_ms: float
    decoder_ms: float


class GpuWorker:
    def __init__(
        self,
        backend: Backend,
        prompts: PromptsConfig,
        batches: BatchQueue[Batch],
        publish: Publish,
        *,
        in_flight: InFlight,
        metrics: Metrics,
        postprocess: Postprocess | None = None,
        infer_pool: ThreadPoolExecutor | None = None,
        post_threads: int | None = None,
        post_processes: int = 0,
        device_masks: bool = True,
        run_id: str = "",
        cameras: Sequence[CameraConfig] = (),
    ) -> None:
        """``run_id`` goes into every result (:func:`sam3stream.stream.frames.new_run_id`).
        ``cameras``: their own classes and thresholds (:meth:`PromptsConfig.camera_thresholds`)
        and zones (:class:`sam3stream.zones.CameraZones`); a camera not listed takes the prompts'
        and has no zones.
        ``infer_pool``: the one thread that talks to the backend, when the caller made it
        (it loaded the backend there, so device contexts stay on one thread); else our own.
        ``post_processes`` > 0: a batch's frames are postprocessed in that many processes
        (started with the worker) instead of ``post_threads`` threads. ``device_masks``: have
        kept masks encoded by a backend that offers it (``encodes_masks``), at each frame's
        output size."""
        check_post_processes(post_processes, postprocess)
        self._backend = backend
        self._infer_pool = infer_pool
        self._labels = list(prompts.classes)
        self._thresholds = prompts.threshold_list
        self._camera_thresholds = {cam.name: prompts.camera_thresholds(cam) for cam in cameras}
        self._zones = {cam.name: z for cam in cameras if (z := CameraZones.of(cam)) is not None}
        # The backend keeps masks from the lowest threshold any camera uses.
        self._min_score = min(
            self._thresholds + [t for ts in self._camera_thresholds.values() for t in ts if t != math.inf]
        )
        self._mask_size = prompts.mask_wh
        self._batches = batches
        self._publish = publish
        self._in_flight = in_flight
        self._metrics = metrics
        self._postprocess = postprocess if postprocess is not None else default_postprocess()
        self.post_threads = post_threads_or_default(post_threads)
        self.post_processes = post_processes
        self.device_masks = device_masks and bool(getattr(backend, "encodes_masks", False))
        # A batch's frames: threads when post_threads > 1, processes when post_processes > 0.
        self._frame_pool: ThreadPoolExecutor | ProcessPoolExecutor | None = None
        self.text: TextFeatures | None = None
        self.batches_done = 0
        self.run_id = run_id

    async def run(self) -> None:
        own_pool = self._infer_pool is None
        infer_pool = self._infer_pool or single_thread("sam3-infer")
        post_pool = single_thread("sam3-post")
        loop = asyncio.get_running_loop()
        try:
            await self._start_frame_pool()
            try:
                text = await loop.run_in_executor(infer_pool, self._backend.encode_text, self._labels)
            except Exception as exc:
                raise EngineDeadError(f"the text encoder failed: {exc!r}") from exc
            self.text = text
            log.info(
                "prompts_encoded",
                classes=self._labels,
                min_score=self._min_score,
                **self._camera_prompts(),
                post_threads=0 if self.post_processes else self.post_threads,
                post_processes=self.post_processes,
                masks_encoded_on="device" if self.device_masks else "host",
            )
            handoff: asyncio.Queue[_Inferred] = asyncio.Queue(maxsize=1)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._infer_loop(infer_pool, text, handoff), name="worker-infer")
                    tg.create_task(self._post_loop(post_pool, handoff), name="worker-post")
            except BaseExceptionGroup as group:
                # Re-raise the one real error, not a group wrapping it: callers match on the type.
                raise first_error(group) from None
        finally:
            if own_pool:
                await close_executor(infer_pool, _THREAD_CLOSE_S)
            await close_executor(post_pool, _THREAD_CLOSE_S)
            await self._close_frame_pool()

    async def _start_frame_pool(self) -> None:
        if self.post_processes:
            # Spawned, not forked: this process has threads (and maybe a CUDA context) that a
            # fork would copy mid-flight. Started now, so the first batch does not wait for them.
            pool = ProcessPoolExecutor(
                self.post_processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_interrupts,
            )
            self._frame_pool = pool
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            try:
                await asyncio.gather(
                    *(loop.run_in_executor(pool, os.getpid) for _ in range(self.post_processes))
                )
            except BrokenExecutor as exc:
                self._drop_processes(
                    pool,
                    exc,
                    "they did not start; postprocessing in this process. A program that embeds "
                    'the pipeline must guard its entry point with if __name__ == "__main__":',
                )
                return
            log.info(
                "post_processes_started",
                processes=self.post_processes,
                seconds=round(time.perf_counter() - t0, 2),
            )
        elif self.post_threads > 1:
            self._frame_pool = ThreadPoolExecutor(self.post_threads, thread_name_prefix="sam3-post-frame")

    async def _close_frame_pool(self) -> None:
        pool, self._frame_pool = self._frame_pool, None
        if isinstance(pool, ThreadPoolExecutor):
            await close_executor(pool, _THREAD_CLOSE_S)
        elif pool is not None:
            # Idle by now (the post loop has ended): joining its processes is quick. Like
            # close_executor, it also completes when the caller is cancelled while it waits.
            await in_background(_join_processes(pool))

    async def _infer_loop(
        self, pool: ThreadPoolExecutor, text: TextFeatures, handoff: asyncio.Queue[_Inferred]
    ) -> None:
        # With a backend that can ``submit`` (queue work on the GPU and return), batch n+1 is
        # uploaded and queued before waiting for batch n, so the GPU never idles between them.
        overlap = callable(getattr(self._backend, "submit", None))
        pending: _Submitted | None = None
        while True:
            if pending is None:
                batch: Batch | None = await self._batches.get()
            else:
                batch = None if self._batches.empty() else self._batches.get_nowait()
            submitted = None if batch is None else await self._engine(pool, self._submit, batch, text)
            if pending is not None:
                await handoff.put(await self._engine(pool, self._finish, pending))
            pending = submitted
            if pending is not None and not overlap:
                await handoff.put(await self._engine(pool, self._finish, pending))
                pending = None

    async def _engine(self, pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        """Run an engine call on the engine's thread; any failure means the engine is dead."""
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except Exception as exc:
            log.error("engine_failed", error=repr(exc))
            raise EngineDeadError(f"inference failed, stopping: {exc!r}") from exc

    def _submit(self, batch: Batch, text: TextFeatures) -> _Submitted:
        started = time.monotonic()
        t0 = time.perf_counter()
        pixels = np.stack([f.pixels for f in batch.frames])
        t1 = time.perf_counter()
        # Only a backend that encodes masks takes mask sizes (see device_masks).
        sizes = (self._mask_sizes(batch.frames),) if self.device_masks else ()
        submit = getattr(self._backend, "submit", None)
        if callable(submit):
            finish: Callable[[], RawOutputs] = submit(pixels, text, self._min_score, *sizes).result
        else:
            raw = self._backend.infer(pixels, text, self._min_score, *sizes)
            finish = functools.partial(_identity, raw)
        return _Submitted(batch, started, (t1 - t0) * 1000, t1, finish)

    def _finish(self, submitted: _Submitted) -> _Inferred:
        raw = submitted.finish()
        infer_ms = (time.perf_counter() - submitted.submitted) * 1000
        batch = submitted.batch
        if raw.batch != len(batch.frames):
            raise RuntimeError(f"backend returned {raw.batch} results for {len(batch.frames)} frames")
        # Backends that time their own stages say so; otherwise it all counts as vision.
        timings = dict(getattr(self._backend, "last_timings", None) or {})
        decoder_ms = float(timings.get("decoder", 0.0))
        vision_ms = float(timings.get("vision", max(infer_ms - decoder_ms, 0.0)))
        return _Inferred(batch, raw, submitted.started, submitted.preprocess_ms, vision_ms, decoder_ms)

    async def _post_loop(self, pool: ThreadPoolExecutor, handoff: asyncio.Queue[_Inferred]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            inferred = await handoff.get()
            results, failure = await loop.run_in_executor(pool, self._results, inferred)
            frames = inferred.batch.frames
            if failure is not None:  # the frames before the failing one are still delivered
                log.error("postprocess_failed", error=str(failure), delivered_first=len(results))
            else:
                timing = results[0].timing if results else StageTimes()
                self._metrics.batch(
                    len(frames),
                    {
                        "queue_wait": sum(r.timing.queue_wait for r in results) / max(len(results), 1),
                        "preprocess": timing.preprocess,
                        "vision": timing.vision,
                        "decoder": timing.decoder,
                        "postprocess": timing.postprocess,
                    },
                )
            for frame, result in zip(frames, results, strict=False):
                await self._publish(result, frame.image)
                self._metrics.result(frame.camera, result)
            self._in_flight.done(len(results))
            if failure is not None:
                raise failure
            self.batches_done += 1

    def _camera_prompts(self) -> dict[str, dict[str, dict[str, float]]]:
        """For the start-up log: the cameras whose classes or thresholds are their own."""
        own = {
            name: {label: t for label, t in zip(self._labels, ts, strict=True) if t != math.inf}
            for name, ts in self._camera_thresholds.items()
            if ts != self._thresholds
        }
        return {"camera_thresholds": own} if own else {}

    def _mask_sizes(self, frames: Sequence[Frame]) -> list[tuple[int, int]]:
        """(width, height) of each frame's masks: the configured size or the frame's own."""
        return [self._mask_size or (f.width, f.height) for f in frames]

    def _post_args(self, raw: RawOutputs, b: int, frame: Frame) -> tuple[Any, ...]:
        """The postprocess call's arguments for frame ``b`` of ``raw``. For a camera that keeps
        only what is in its zones, the queries outside them get a score that no threshold
        reaches, so that their masks are never resized or encoded."""
        thresholds = self._camera_thresholds.get(frame.camera, self._thresholds)
        zones = self._zones.get(frame.camera)
        if zones is not None and zones.only_in_zones:
            from sam3stream.postprocess import frame_outputs

            one = frame_outputs(raw, b)
            scores = np.where(zones.holds(one.boxes), one.scores, -np.inf).astype(one.scores.dtype)
            raw, b = dataclasses.replace(one, scores=scores), 0
        return (raw, b, self._labels, thresholds, frame.width, frame.height, self._mask_size)

    def _drop_processes(self, pool: ProcessPoolExecutor, exc: BaseException, detail: str) -> None:
        """Postprocess in this process from now on: nothing is lost, the log says why it is slower."""
        log.error("post_processes_failed", error=repr(exc), detail=detail)
        self._frame_pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def _in_processes(
        self, pool: ProcessPoolExecutor, inferred: _Inferred, detect: Callable[[int], list[Detection]]
    ) -> Iterator[list[Detection]]:
        """A batch's detections in frame order. A frame with masks is sent to the processes with
        its own outputs only; one without (most frames, often) is cheaper here than the round
        trip, as is one whose masks the backend encoded. If a process dies, the frames from there
        on and the later batches are postprocessed here (``detect``)."""
        from sam3stream.postprocess import frame_outputs

        frames, raw = inferred.batch.frames, inferred.raw
        work: list[Future[list[Detection]] | None] = []  # None: postprocessed here, in its turn
        try:
            for b, f in enumerate(frames):
                one = frame_outputs(raw, b)
                args = self._post_args(one, 0, f)
                work.append(pool.submit(self._postprocess, *args) if one.masks.size else None)
        except BrokenExecutor as exc:
            self._drop_processes(pool, exc, "postprocessing here from now on")
            work = [None] * len(frames)
        for b, item in enumerate(work):
            if item is not None:
                try:
                    yield _detections_for(frames[b], item.result)
                    continue
                except BrokenExecutor as exc:
                    self._drop_processes(pool, exc, "postprocessing here from now on")
                    work[b:] = [None] * (len(frames) - b)
            yield detect(b)

    def _results(self, inferred: _Inferred) -> tuple[list[FrameResult], PostprocessError | None]:
        """The batch's results in frame order, and the failure that stopped it short, if one
        did: the frames before the failing one keep their results, to be delivered."""
        t0 = time.perf_counter()
        frames = inferred.batch.frames

        def detect(b: int) -> list[Detection]:
            return _detections_for(frames[b], self._postprocess, *self._post_args(inferred.raw, b, frames[b]))

        def in_zones(frame: Frame, dets: list[Detection]) -> list[Detection]:
            zones = self._zones.get(frame.camera)
            return dets if zones is None else zones.apply(dets)

        pool = self._frame_pool
        ordered: Iterable[list[Detection]]
        if isinstance(pool, ProcessPoolExecutor):
            ordered = self._in_processes(pool, inferred, detect)
        elif pool is not None and len(frames) > 1:
            ordered = pool.map(detect, range(len(frames)))  # in frame order
        else:
            ordered = (detect(b) for b in range(len(frames)))
        detections: list[list[Detection]] = []
        failure: PostprocessError | None = None
        try:
            for frame, dets in zip(frames, ordered, strict=False):
                detections.append(in_zones(frame, dets))
        except PostprocessError as exc:
            failure = exc
        post_ms = (time.perf_counter() - t0) * 1000
        now = time.time()
        results = [
            FrameResult(
                run=self.run_id,
                camera=f.camera,
                seq=f.seq,
                pts=f.pts,
                stream_time=f.stream_time,
                capture_time=f.capture_time,
                width=f.width,
                height=f.height,
                detections=dets,
                timing=StageTimes(
                    queue_wait=max(inferred.started - f.enqueued, 0.0) * 1000,
                    preprocess=inferred.preprocess_ms,
                    vision=inferred.vision_ms,
                    decoder=inferred.decoder_ms,
                    postprocess=post_ms,
                    end_to_end=(now - f.capture_time) * 1000,
                    batch_size=len(frames),
                ),
            )
            for f, dets in zip(frames, detections, strict=False)  # detections: up to a failure
        ]
        return results, failure


def _detections_for(frame: Frame, fn: Callable[..., list[Detection]], *args: Any) -> list[Detection]:
    """``fn(*args)``: one frame's detections; its failure names the camera and the frame."""
    try:
        return fn(*args)
    except BrokenExecutor:
        raise  # a dead process, not this frame: the caller postprocesses here instead
    except Exception as exc:
        raise PostprocessError(
            f"postprocessing frame {frame.seq} of camera {frame.camera!r} failed: {exc!r}"
        ) from exc


async def _join_processes(pool: ProcessPoolExecutor) -> None:
    closing = asyncio.ensure_future(asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True))
    await asyncio.wait({closing}, timeout=_THREAD_CLOSE_S)
