"""Fan-out: every result to every sink, each through its own bounded queue and runner task.

A sink never slows inference down unless it asked to: ``drop_oldest`` routes
(MQTT, the embedding app's subscriber) throw away their oldest undelivered
result when full and count it; ``block`` routes (files) make the pipeline wait,
because losing lines from a file is worse than running slower. A sink that
raises is logged and counted, and its runner carries on with the next result.

Each route also reports its queue's depth (on every change) and how long each publish call
takes, so that a sink falling behind is named in the metrics, not just seen as the batches'
``queue_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.config import OnFull
from sam3stream.errors import Sam3StreamError
from sam3stream.metrics import Metrics
from sam3stream.sinks.base import Sink
from sam3stream.stream.frames import FrameResult

__all__ = ["Fanout", "SinkRoute", "Subscriber"]

log = structlog.get_logger(__name__)

Image: TypeAlias = npt.NDArray[np.uint8] | None
_LOG_EVERY_S = 10.0  # a sink failing on every result logs once per this, with a count


class SinkRoute:
    """One sink, its queue and its runner."""

    def __init__(
        self,
        sink: Sink,
        *,
        name: str,
        capacity: int,
        on_full: OnFull,
        cameras: Iterable[str] = (),
        metrics: Metrics,
        close_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.name = name
        self.on_full = on_full
        self.cameras = frozenset(cameras)  # empty: all cameras
        self.queue: asyncio.Queue[tuple[FrameResult, Image]] = asyncio.Queue(maxsize=capacity)
        self._metrics = metrics
        self._close_timeout_s = close_timeout_s
        self._clock = clock
        self.errors = 0
        self.dropped = 0
        self._errors_unlogged = 0
        self._last_logged = float("-inf")
        self._publishing: asyncio.Future[None] | None = None
        metrics.register_sink(name, capacity)

    @property
    def wants_images(self) -> bool:
        return bool(getattr(self.sink, "wants_images", False))

    def accepts(self, camera: str) -> bool:
        return not self.cameras or camera in self.cameras

    async def offer(self, result: FrameResult, image: Image) -> None:
        item = (result, image if self.wants_images else None)
        if self.on_full == "block":
            await self.queue.put(item)
        else:
            if self.queue.full():
                self.queue.get_nowait()
                self.queue.task_done()
                self._count_dropped(1)
            self.queue.put_nowait(item)
        self._depth_changed()

    def _depth_changed(self) -> None:
        self._metrics.sink_queue_depth(self.name, self.queue.qsize())

    async def start(self) -> None:
        try:
            await self.sink.start()
        except Exception as exc:
            # Before any frame flows: a sink that cannot start is a setup problem; say which.
            raise Sam3StreamError(f"sink {self.name!r} could not start: {exc}") from exc

    async def run(self) -> None:
        """Deliver queued results until cancelled, then close the sink."""
        try:
            while True:
                result, image = await self.queue.get()
                self._depth_changed()
                # Shielded: a stop lands between results, and _settle_rest decides what becomes
                # of the one being published (finished for block routes, dropped otherwise).
                self._publishing = asyncio.ensure_future(self._deliver(result, image))
                await asyncio.shield(self._publishing)
        finally:
            await self._settle_rest()
            await self.close()

    async def _deliver(self, result: FrameResult, image: Image) -> None:
        started = self._clock()
        try:
            await self.sink.publish(result, image)
        except asyncio.CancelledError:
            self._count_dropped(1)
            raise
        except Exception as exc:
            self._published(started, delivered=False)
            self.record_error("sink_publish_failed", exc)
        else:
            self._published(started, delivered=True)
        finally:
            self.queue.task_done()

    def _published(self, started: float, *, delivered: bool) -> None:
        self._metrics.sink_published(self.name, (self._clock() - started) * 1000.0, delivered=delivered)

    async def _settle_rest(self) -> None:
        """After a stop that did not drain (the engine died, or the drain timed out): a ``block``
        route still hands its sink what it holds, within the close timeout; whatever is left then
        is counted as dropped and logged, never lost without a word."""
        publishing, self._publishing = self._publishing, None
        undelivered_before = self.dropped
        block = self.on_full == "block"
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(self._close_timeout_s if block else 0.0):
                if publishing is not None:
                    await publishing  # cancelled by the timeout: _deliver counts it
                while block and not self.queue.empty():
                    item = self.queue.get_nowait()
                    self._depth_changed()
                    await self._deliver(*item)
        left = self.queue.qsize()
        for _ in range(left):
            self.queue.get_nowait()
            self.queue.task_done()
        self._count_dropped(left)
        self._depth_changed()
        if self.dropped > undelivered_before:
            log.warning("sink_undelivered", sink=self.name, results=self.dropped - undelivered_before)

    def _count_dropped(self, n: int) -> None:
        if n:
            self.dropped += n
            self._metrics.sink_dropped(self.name, n)

    async def close(self) -> None:
        """Close the sink (bounded in time); errors are logged and counted."""
        try:
            async with asyncio.timeout(self._close_timeout_s):
                await self.sink.aclose()
        except Exception as exc:
            self.record_error("sink_close_failed", exc, force=True)

    def record_error(self, event: str, exc: Exception, *, force: bool = False) -> None:
        self.errors += 1
        self._errors_unlogged += 1
        self._metrics.sink_error(self.name)
        now = self._clock()
        if force or now - self._last_logged >= _LOG_EVERY_S:
            log.error(event, sink=self.name, error=repr(exc), errors=self._errors_unlogged, exc_info=exc)
            self._last_logged = now
            self._errors_unlogged = 0


class Subscriber:
    """A drop-oldest queue of results for code embedding the pipeline (``Pipeline.results()``)."""

    def __init__(self, capacity: int) -> None:
        self.queue: asyncio.Queue[FrameResult] = asyncio.Queue(maxsize=capacity)
        self.dropped = 0

    def offer(self, result: FrameResult) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(result)


class Fanout:
    """Hands each result to every route that takes its camera, and to the subscriber."""

    def __init__(self, routes: list[SinkRoute], subscriber: Subscriber | None = None) -> None:
        self.routes = routes
        self.subscriber = subscriber

    def wants_images(self, camera: str) -> bool:
        return any(r.wants_images and r.accepts(camera) for r in self.routes)

    async def publish(self, result: FrameResult, image: Image) -> None:
        for route in self.routes:
            if route.accepts(result.camera):
                await route.offer(result, image)
        if self.subscriber is not None:
            self.subscriber.offer(result)

    async def camera_state(self, camera: str, state: str, error: str | None) -> None:
        """Pass a camera's state change to the sinks that report it (MQTT's status topic)."""
        for route in self.routes:
            publish_status = getattr(route.sink, "publish_status", None)
            if publish_status is None or not route.accepts(camera):
                continue
            try:
                await publish_status(camera, state, error)
            except Exception as exc:
                route.record_error("sink_status_failed", exc)

    async def join(self) -> None:
        """Wait until every sink has taken everything queued for it."""
        for route in self.routes:
            await route.queue.join()
