"""Run the demo config through the embedding API for a bounded time and collect what happened.

The run ends after ``seconds`` (counted once the engine is loaded) or when every
clip has ended, whichever comes first; then the pipeline drains. Ctrl-C once
stops early (with a drain, so the summary still comes); twice aborts.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.config import Config
from sam3stream.stream.frames import FrameResult

if TYPE_CHECKING:
    from sam3stream.stream.pipeline import Pipeline

__all__ = ["LabelCounter", "RunOutcome", "run_pipeline"]

log = structlog.get_logger(__name__)


class LabelCounter:
    """A lossless sink that counts detections per camera and label and keeps every latency."""

    name = "demo-counter"
    lossless = True
    wants_images = False

    def __init__(self) -> None:
        self.labels: dict[str, Counter[str]] = {}
        self.latencies_ms: list[float] = []

    async def start(self) -> None:
        return None

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None:
        counts = self.labels.setdefault(result.camera, Counter())
        counts.update(d.label for d in result.detections)
        self.latencies_ms.append(result.timing.end_to_end)

    async def aclose(self) -> None:
        return None


@dataclass
class RunOutcome:
    snapshot: dict[str, Any]  # Metrics.snapshot() after the pipeline stopped
    run_s: float  # from the engine being ready to the end of the drain
    stop_reason: str  # "time", "interrupt" or "clips ended"
    drain_s: float | None  # from the stop request to the end (None: the clips ended first)
    drained: bool | None  # whether every frame accepted got its result (False: the drain hit its bound)
    in_flight: int  # frames accepted but never processed (a drain that hit its bound)
    camera_errors: dict[str, str]
    labels: dict[str, Counter[str]] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)


class _Stopper:
    """Requests the pipeline's stop once, remembering why and when; a second Ctrl-C aborts."""

    def __init__(self, pipeline: Pipeline, task: asyncio.Task[Any] | None) -> None:
        self.pipeline = pipeline
        self.task = task
        self.reason = "clips ended"
        self.at: float | None = None
        self.interrupts = 0

    def stop(self, reason: str) -> None:
        if self.at is None:
            self.reason, self.at = reason, time.perf_counter()
            log.info("demo_stopping", reason=reason)
            self.pipeline.request_stop()

    def interrupt(self) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.stop("interrupt")
        elif self.task is not None:
            log.warning("demo_aborting", reason="second interrupt")
            self.task.cancel()


@contextlib.contextmanager
def _on_sigint(handler: Callable[[], None]) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (Windows, not main thread)
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def run_pipeline(config: Config, seconds: float) -> RunOutcome:
    """Run until ``seconds`` have passed since the engine was ready, every clip ended, or Ctrl-C."""
    from sam3stream.stream.pipeline import Pipeline

    counter = LabelCounter()
    async with Pipeline(config, sinks=[counter], results_queue=0) as p:
        start = time.perf_counter()
        stopper = _Stopper(p, asyncio.current_task())
        timer = asyncio.get_running_loop().call_later(seconds, stopper.stop, "time")
        try:
            with _on_sigint(stopper.interrupt):
                await p.wait()
        finally:
            timer.cancel()
        end = time.perf_counter()
    return RunOutcome(
        snapshot=p.metrics.snapshot(),
        run_s=end - start,
        stop_reason=stopper.reason,
        drain_s=None if stopper.at is None else end - stopper.at,
        drained=p.drained,
        in_flight=p.in_flight.count,
        camera_errors=p.camera_errors(),
        labels=counter.labels,
        latencies_ms=counter.latencies_ms,
    )
