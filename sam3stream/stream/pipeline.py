"""Pipeline: builds the queues and actors from a Config and supervises them.

    async with Pipeline(config) as p:
        async for result in p.results():
            ...

All actors run in one TaskGroup with named tasks, so one failing actor (the
engine dying) stops all of them and the error reaches whoever awaits the
pipeline. Stopping drains: sources stop, frames already accepted get their
results, sinks get everything queued for them, then the rest is cancelled.
When every camera ends on its own (files), the drain waits as long as it takes: nothing was
asked to stop, so nothing is given up. A stop request (stop(), a signal) drains for at most
``lifecycle.drain_timeout_s``; after it, each sink has
as long again to finish what it holds (``block`` sinks; the rest count it as
dropped) and as long again to close, so a stuck sink bounds a stop at about
three times the timeout.

Start-up: the metrics port is bound and the file sinks' folders are checked first (a taken
port or an unwritable folder fails before the engine loads), then
the engine is loaded, checked and warmed up (compiled, graphs captured) before any camera or
sink starts, so the first frames do not wait behind a compile.

The pipeline never touches the event loop policy or signal handlers: it can
run inside any application's loop. The CLI adds those (commands/run.py).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import random
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from sam3stream.config import Config, sink_name, validate_config
from sam3stream.errors import BackendUnavailableError, EngineMismatchError
from sam3stream.log import use_standard_logging
from sam3stream.metrics import Metrics, Reporter
from sam3stream.runtime.loader import open_backend
from sam3stream.runtime.manifest import check_engine_matches, check_engine_source
from sam3stream.runtime.types import Backend
from sam3stream.sinks.base import Sink
from sam3stream.stream.batch_queue import BatchQueue
from sam3stream.stream.batcher import Batch, Batcher
from sam3stream.stream.fanout import Fanout, SinkRoute, Subscriber
from sam3stream.stream.frames import FrameResult, new_run_id
from sam3stream.stream.mailbox import Doorbell, Inbox, InFlight
from sam3stream.stream.source import STOPPED_NOTICE_S, CameraSource
from sam3stream.stream.tasks import first_error
from sam3stream.stream.threads import close_executor, single_thread
from sam3stream.stream.worker import GpuWorker, Postprocess, check_post_processes, post_threads_or_default
from sam3stream.zones import CameraZones

__all__ = ["Pipeline"]

log = structlog.get_logger(__name__)

_EXTRA_SINK_QUEUE = 256
_BACKEND_CLOSE_S = 30.0


class Pipeline:
    """Cameras -> batcher -> GPU worker -> sinks, as one supervised unit.

    ``backend``: use this one instead of opening ``config.engines`` (tests,
    embedding); the caller keeps ownership and closes it. ``sinks``: extra
    sinks next to the configured ones. ``post_threads`` / ``post_processes``: threads or
    processes a batch's postprocessing is spread over (None: the config's ``[postprocess]``,
    whose defaults are a quarter of the cores in threads, 1 to 4). ``postprocess``: replaces
    :func:`sam3stream.postprocess.to_detections`; the outputs it is given may carry their masks
    already encoded (``RawOutputs.mask_counts``) unless ``[postprocess] device_masks = false``.
    ``results_queue``: how many results
    :meth:`results` keeps for a slow reader before dropping the oldest (0: no
    :meth:`results` at all, for programs that only use sinks).
    """

    def __init__(
        self,
        config: Config,
        *,
        backend: Backend | None = None,
        sinks: Sequence[Sink] = (),
        metrics: Metrics | None = None,
        results_queue: int = 256,
        postprocess: Postprocess | None = None,
        rng: random.Random | None = None,
        post_threads: int | None = None,
        post_processes: int | None = None,
    ) -> None:
        if not structlog.is_configured():
            # Embedded in an application that has not set structlog up: its logging setup
            # decides what shows (the CLI configures structlog before it gets here).
            use_standard_logging()
        # A Config built in code has not been through the file's checks (a TOML-loaded one passes
        # them again unchanged): its problems surface here, named by key, not deep in a start.
        config = validate_config(config)
        self.config = config
        self.run_id = new_run_id()  # in every result: seq starts again at 0 after a restart
        self.metrics = metrics if metrics is not None else Metrics(window_s=config.metrics.interval_s)
        self._given_backend = backend
        self._extra_sinks = list(sinks)
        self._register_metrics()
        self._postprocess = postprocess
        # Checked now, not when the worker starts after a minute of loading the engine.
        self._post_threads = post_threads_or_default(
            config.postprocess.threads if post_threads is None else post_threads
        )
        self._post_processes = config.postprocess.processes if post_processes is None else post_processes
        check_post_processes(self._post_processes, postprocess)
        self._rng = rng or random.Random()
        self._subscriber = Subscriber(results_queue) if results_queue > 0 else None
        self._reading = False
        self._stop_requested = asyncio.Event()
        self._started = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self.backend: Backend | None = None
        self.sources: dict[str, CameraSource] = {}
        self.inboxes: dict[str, Inbox] = {}
        self.batches: BatchQueue[Batch] = BatchQueue(config.batching.batch_queue)
        self.routes: list[SinkRoute] = []
        self.in_flight = InFlight()
        # After the end: whether every accepted frame's results reached every sink (False: a
        # stop's drain timed out with frames unprocessed, or a sink did not take what it held
        # in time; the sink_undelivered log lines count those).
        self.drained: bool | None = None
        self._cut_short: tuple[int, dict[str, int]] | None = None  # (in flight, dropped per sink)

    # ------------------------------------------------------------------ public API

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.stop()
        else:
            await self.abort()

    async def start(self) -> None:
        """Load the engine, start every actor; return once frames can flow (or raise why not)."""
        if self._main is not None:
            raise RuntimeError("a Pipeline can only be started once")
        self._main = asyncio.create_task(self._run(), name="sam3stream-pipeline")
        started = asyncio.ensure_future(self._started.wait())
        try:
            await asyncio.wait({started, self._main}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.abort()  # the caller gave up while the engine loaded: leave nothing running
            raise
        finally:
            started.cancel()
        if self._main.done():
            self._raise_outcome()

    async def wait(self) -> None:
        """Until the pipeline has finished: all files ended, stop() drained it, or it failed (raises)."""
        main = self._require_started()
        await asyncio.wait({main})
        self._raise_outcome()

    async def stop(self) -> None:
        """Drain and stop: sources stop, in-flight frames finish, sinks flush (bounded in time)."""
        self.request_stop()
        await self.wait()

    def request_stop(self) -> None:
        """Start a drain without waiting for it (for signal handlers); :meth:`wait` sees it end."""
        main = self._require_started()
        if self._started.is_set():
            self._stop_requested.set()
        else:
            main.cancel()  # still loading the engine: nothing to drain

    async def abort(self) -> None:
        """Stop without draining (for errors and a second Ctrl-C): cameras, batches and the GPU stop
        now; what the sinks already hold still goes to ``block`` sinks within
        ``lifecycle.drain_timeout_s`` (nothing lost without a count), then the sinks close."""
        main = self._require_started()
        main.cancel()
        await asyncio.wait({main})
        if not main.cancelled() and main.exception() is not None:
            log.debug("pipeline_aborted_after_error", error=repr(main.exception()))

    async def results(self) -> AsyncIterator[FrameResult]:
        """Results as they come, until the pipeline finishes (raises if it failed).

        Reading is optional: unread results beyond ``results_queue`` are dropped, oldest first.
        One reader at a time: two would split the results between them, so a second raises (hand
        them on yourself, or add a Sink, which gets every result).
        """
        main = self._require_started()
        if self._subscriber is None:
            raise RuntimeError("this pipeline was made with results_queue=0: it keeps no results to read")
        if self._reading:
            raise RuntimeError("results() already has a reader; each result goes to one reader only")
        self._reading = True
        try:
            async for result in self._read(main, self._subscriber.queue):
                yield result
        finally:
            self._reading = False

    async def _read(
        self, main: asyncio.Task[None], queue: asyncio.Queue[FrameResult]
    ) -> AsyncIterator[FrameResult]:
        while True:
            if not queue.empty():
                yield queue.get_nowait()
                continue
            if main.done():
                self._raise_outcome()
                return
            getter = asyncio.ensure_future(queue.get())
            try:
                await asyncio.wait({getter, main}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()

    @property
    def running(self) -> bool:
        """Whether the engine is loaded and the actors started (and not finished)."""
        return self._started.is_set() and self._main is not None and not self._main.done()

    @property
    def results_dropped(self) -> int:
        """Results that ``results()`` dropped because nobody read them in time (sinks count theirs
        in the metrics)."""
        return self._subscriber.dropped if self._subscriber is not None else 0

    def camera_states(self) -> dict[str, str]:
        """Each camera's state: connecting, running, reconnecting (live), ended (a file read to
        its end), failed (a file camera that ended on an error: see camera_errors) or stopped."""
        return {name: src.state for name, src in self.sources.items()}

    def camera_errors(self) -> dict[str, str]:
        """Why each failed camera failed ("cannot open: the file is empty: /videos/a.mp4"). A
        failed camera does not stop the others, nor make ``wait()`` raise."""
        return {name: src.error for name, src in self.sources.items() if src.error is not None}

    # ------------------------------------------------------------------ internals

    def _require_started(self) -> asyncio.Task[None]:
        if self._main is None:
            raise RuntimeError("the pipeline is not started: use `async with Pipeline(config) as p:`")
        return self._main

    def _raise_outcome(self) -> None:
        main = self._require_started()
        if main.cancelled():
            return
        exc = main.exception()
        if exc is not None:
            raise exc

    async def _run(self) -> None:
        infer_pool = single_thread("sam3-infer")
        opened: list[Backend] = []  # filled on the infer thread, even after a cancelled load

        def close_opened() -> None:
            for backend in opened:
                backend.close()

        cfg = self.config.metrics
        reporter = Reporter(
            self.metrics,
            interval_s=cfg.interval_s,
            prometheus_port=cfg.prometheus_port,
            prometheus_host=cfg.prometheus_host,
        )
        # Loading includes the warm-up: neither can be interrupted (see the finally below).
        loading, interrupted_load = True, False
        try:
            # Binds the metrics port before the engine loads: a taken one fails at once, naming
            # its config key, not after a minute of loading. Leaving the block closes it.
            with reporter:
                # Likewise a sink folder that cannot be written: it fails now, all of them named.
                from sam3stream.sinks.base import check_output_folders

                await asyncio.to_thread(check_output_folders, self.config.sinks)
                backend = self._given_backend or await self._open_backend(infer_pool, opened)
                self.backend = backend
                self._check_engine(backend)
                await self._warm_up(backend, infer_pool)
                loading = False
                await self._run_with(backend, infer_pool, reporter)
        except asyncio.CancelledError:
            interrupted_load = loading
            raise
        finally:
            if interrupted_load:
                # Stopped while the engine was exported, loaded or warmed: none can be interrupted.
                # The backend it makes is closed on its thread; a process exit waits for that.
                log.warning(
                    "engine_load_interrupted",
                    detail="the export, load or warm-up cannot be interrupted: it finishes on its thread, "
                    "then the engine it made is closed",
                )
                infer_pool.submit(close_opened)
                infer_pool.shutdown(wait=False)
            else:
                # A backend we opened is closed on its own thread, after any call still running.
                await close_executor(infer_pool, _BACKEND_CLOSE_S, close_opened)

    async def _open_backend(self, infer_pool: ThreadPoolExecutor, opened: list[Backend]) -> Backend:
        engines = self.config.engines
        engine_dir = await self._engine_dir()
        log.info("engine_loading", backend=engines.backend, dir=str(engine_dir), device=engines.device)
        loop = asyncio.get_running_loop()
        # Loaded on the thread that will run it: device contexts and streams stay on one thread.
        open_it = functools.partial(
            open_backend,
            engines.backend,
            engine_dir,
            engines.device,
            precision=engines.precision,
            overlap=engines.overlap,
            fused_gelu=engines.fused_gelu,
            compile_cache=engines.compile_cache,
            # A camera sends one frame per round, so fewer cameras than max_batch mean smaller batches.
            typical_batch=min(self.config.batching.max_batch, len(self.config.cameras)),
        )

        def load() -> Backend:
            backend = open_it()
            opened.append(backend)  # before the caller may have given up: see _run
            return backend

        return await loop.run_in_executor(infer_pool, load)

    async def _engine_dir(self) -> Path:
        engines = self.config.engines
        path = Path(engines.dir)
        if engines.backend == "fake" or await asyncio.to_thread(path.exists):
            return path
        export = engines.export
        if export is None:
            raise EngineMismatchError(
                f"engine directory {path} does not exist; add [engines.export] to the config to make it "
                f"on first run, or make it with `sam3stream export ... --out {path}`"
            )
        try:
            module = importlib.import_module("sam3stream.model.export")
        except ImportError as exc:
            raise BackendUnavailableError(
                f"{path} does not exist and exporting it needs {exc.name or exc}: "
                "pip install 'sam3stream[export]'"
            ) from exc
        source = f"random {export.random}" if export.random else f"checkpoint {export.checkpoint}"
        log.info("engine_export_started", out=str(path), source=source, resolution=export.resolution)
        await asyncio.to_thread(
            module.export_engines,
            random=export.random,
            checkpoint=Path(export.checkpoint) if export.checkpoint else None,
            resolution=export.resolution,
            batch=self.config.batching.max_batch,
            queries=export.queries,
            out=path,
            seed=export.seed,
            progress=lambda step: log.info("engine_export_progress", step=step),
        )
        log.info("engine_export_done", out=str(path))
        return path

    def _check_engine(self, backend: Backend) -> None:
        export = self.config.engines.export
        manifest, engine_dir = backend.manifest, Path(self.config.engines.dir)
        log.info("engine_loaded", model=manifest.model.source, resolution=manifest.resolution)
        check_engine_matches(
            manifest,
            engine_dir,
            resolution=export.resolution if export is not None else None,
            batch=self.config.batching.max_batch,
            queries=export.queries if export is not None else None,
        )
        if export is not None and self.config.engines.backend != "fake":
            check_engine_source(
                manifest,
                engine_dir,
                random=export.random,
                seed=export.seed,
                checkpoint=Path(export.checkpoint) if export.checkpoint else None,
            )

    def _register_metrics(self) -> None:
        """Every camera and sink in the metrics from the start (the port is bound before the engine
        loads), so each series is scraped at zero before its first event, not only after it."""
        for cam in self.config.cameras:
            self.metrics.register_camera(cam.name)
        for i, cfg in enumerate(self.config.sinks):
            self.metrics.register_sink(sink_name(i, cfg), cfg.queue)
        for sink in self._extra_sinks:
            self.metrics.register_sink(sink.name, _EXTRA_SINK_QUEUE)

    def _make_routes(self) -> list[SinkRoute]:
        from sam3stream.sinks.base import make_sink  # the sink modules import aiomqtt, av: only when used

        routes = []
        close_s = max(1.0, self.config.lifecycle.drain_timeout_s)
        cameras = [cam.name for cam in self.config.cameras]
        zones = {cam.name: z.zones for cam in self.config.cameras if (z := CameraZones.of(cam)) is not None}
        for i, cfg in enumerate(self.config.sinks):
            name = sink_name(i, cfg)
            sink = make_sink(cfg, name=name, metrics=self.metrics, cameras=cameras, zones=zones)
            routes.append(
                SinkRoute(
                    sink,
                    name=name,
                    capacity=cfg.queue,
                    on_full=cfg.on_full,
                    cameras=cfg.cameras,
                    metrics=self.metrics,
                    close_timeout_s=close_s,
                )
            )
        for sink in self._extra_sinks:
            routes.append(
                SinkRoute(
                    sink,
                    name=sink.name,
                    capacity=_EXTRA_SINK_QUEUE,
                    on_full="block" if sink.lossless else "drop_oldest",
                    metrics=self.metrics,
                    close_timeout_s=close_s,
                )
            )
        return routes

    async def _start_routes(self, routes: list[SinkRoute]) -> None:
        started: list[SinkRoute] = []
        try:
            for route in routes:
                await route.start()
                started.append(route)
        except BaseException:
            for route in started:
                await route.close()
            raise

    async def _warm_up(self, backend: Backend, infer_pool: ThreadPoolExecutor) -> None:
        """Let a backend that compiles on first use (torch on CUDA) do it before any camera
        starts, so that the first frames do not wait a minute behind it."""
        warm_up = getattr(backend, "warm_up", None)
        if not callable(warm_up):
            return
        labels = list(self.config.prompts.classes)
        log.info("engine_warming_up", detail="compiling each step and capturing every batch slot")

        def run() -> float:
            return float(warm_up(backend.encode_text(labels)))

        seconds = await asyncio.get_running_loop().run_in_executor(infer_pool, run)
        log.info("engine_warmed_up", seconds=round(seconds, 1))

    async def _run_with(self, backend: Backend, infer_pool: ThreadPoolExecutor, reporter: Reporter) -> None:
        manifest = backend.manifest
        cfg = self.config
        self.routes = self._make_routes()
        fanout = Fanout(self.routes, self._subscriber)
        doorbell = Doorbell()
        for cam in cfg.cameras:
            live = cam.effective_mode == "live"
            inbox = Inbox(
                cam.name,
                capacity=1 if live else cfg.batching.camera_queue,
                policy="drop_oldest" if live else "block",
                doorbell=doorbell,
                in_flight=self.in_flight,
                on_drop=self.metrics.frame_dropped,
            )
            self.inboxes[cam.name] = inbox
            self.sources[cam.name] = CameraSource(
                cam,
                inbox,
                resolution=manifest.resolution,
                lifecycle=cfg.lifecycle,
                metrics=self.metrics,
                keep_image=fanout.wants_images(cam.name),
                rng=self._rng,
                on_state=fanout.camera_state,
            )
        batcher = Batcher(
            list(self.inboxes.values()),
            self.batches,
            doorbell=doorbell,
            max_batch=cfg.batching.max_batch,
            max_wait_s=cfg.batching.max_wait_ms / 1000,
        )
        worker = GpuWorker(
            backend,
            cfg.prompts,
            self.batches,
            fanout.publish,
            in_flight=self.in_flight,
            metrics=self.metrics,
            postprocess=self._postprocess,
            infer_pool=infer_pool,
            post_threads=self._post_threads,
            post_processes=self._post_processes,
            device_masks=cfg.postprocess.device_masks,
            run_id=self.run_id,
            cameras=cfg.cameras,
        )
        for route in self.routes:
            publish_stats = getattr(route.sink, "publish_stats", None)
            if publish_stats is not None:
                reporter.add_publisher(route.name, publish_stats)

        await self._start_routes(self.routes)
        log.info(
            "pipeline_started",
            run=self.run_id,
            cameras=len(self.sources),
            sinks=len(self.routes),
            resolution=manifest.resolution,
            max_batch=cfg.batching.max_batch,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                sources = [tg.create_task(s.run(), name=f"source-{n}") for n, s in self.sources.items()]
                rest = [
                    tg.create_task(batcher.run(), name="batcher"),
                    tg.create_task(worker.run(), name="gpu-worker"),
                    tg.create_task(reporter.run(), name="metrics-reporter"),
                    *(tg.create_task(r.run(), name=f"sink-{r.name}") for r in self.routes),
                ]
                self._started.set()
                tg.create_task(self._supervise(sources, rest, fanout), name="supervisor")
        except BaseExceptionGroup as group:
            # Callers match on the error (EngineDeadError), not on a group wrapping it.
            raise first_error(group) from None
        if self._cut_short is not None:
            in_flight, dropped = self._cut_short
            if in_flight == 0 and all(r.dropped == dropped[r.name] for r in self.routes):
                # Every frame had its results when the drain timed out, and the sinks delivered
                # what they still held as they closed: nothing was lost after all.
                self.drained = True
        await reporter.report()
        log.info("pipeline_stopped", drained=self.drained, in_flight=self.in_flight.count)

    async def _until_stop_requested_or(self, work: asyncio.Future[Any]) -> None:
        """Until ``work`` is done or a stop is requested, whichever comes first; ``work`` goes on."""
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def _drain(self, fanout: Fanout) -> None:
        """Until every accepted frame has its results and every sink queue is empty."""
        await self.in_flight.wait_idle()
        await fanout.join()

    async def _supervise(
        self, sources: list[asyncio.Task[None]], rest: list[asyncio.Task[None]], fanout: Fanout
    ) -> None:
        """Wait for a stop request or for every camera to end, then drain and stop the rest."""
        ended = asyncio.ensure_future(asyncio.wait(sources))
        try:
            await self._until_stop_requested_or(ended)
        finally:
            ended.cancel()
        timeout_s = self.config.lifecycle.drain_timeout_s
        # A cancelled source puts nothing more in (its pending put is what gets cancelled),
        # so the drain need not wait for its decode thread to wind down.
        for task in sources:
            task.cancel()
        drain = asyncio.ensure_future(self._drain(fanout))
        try:
            if not self._stop_requested.is_set():
                # Every camera ended and nobody asked to stop (a batch of files): each accepted frame
                # gets its results, however long the engine and the sinks take. A stop requested
                # meanwhile (a signal) bounds the rest by the timeout, counted from then.
                log.info("pipeline_draining", reason="all cameras ended", in_flight=self.in_flight.count)
                await self._until_stop_requested_or(drain)
            if not drain.done():
                log.info("pipeline_draining", reason="stop requested", timeout_s=timeout_s)
            try:
                async with asyncio.timeout(timeout_s):
                    await drain
                self.drained = True
            except TimeoutError:
                self.drained = False
                # The sinks still get what they hold (SinkRoute._settle_rest): _run_with checks
                # at the end whether that was everything.
                self._cut_short = (self.in_flight.count, {r.name: r.dropped for r in self.routes})
                log.warning(
                    "drain_timeout",
                    in_flight=self.in_flight.count,
                    queued={r.name: r.queue.qsize() for r in self.routes},
                )
        finally:
            drain.cancel()  # when the supervisor itself is cancelled (an error, abort)
        if sources:
            # Their "stopped" notices go to the sinks (MQTT's retained status): let them out
            # before the sinks close. A source says it before closing its decode thread.
            await asyncio.wait(sources, timeout=STOPPED_NOTICE_S)
        for task in rest:
            task.cancel()
