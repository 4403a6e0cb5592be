"""A sink route reports its queue depth and each publish call's time, so a sink that falls
behind is named in the metrics rather than seen only as the batches' queue wait."""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt
import pytest

from sam3stream.metrics import Metrics
from sam3stream.stream.fanout import SinkRoute
from sam3stream.stream.frames import FrameResult
from tests.sinks.results import make_result


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class GatedSink:
    """Publishes only when the test opens the gate; each publish takes ``publish_s`` of the
    test's clock. ``fail_on`` seqs raise after taking their time."""

    name = "gated"
    lossless = True
    wants_images = False

    def __init__(self, clock: Clock, publish_s: float, fail_on: frozenset[int] = frozenset()) -> None:
        self.clock = clock
        self.publish_s = publish_s
        self.fail_on = fail_on
        self.gate = asyncio.Event()
        self.got: list[int] = []

    async def start(self) -> None:
        pass

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None:
        await self.gate.wait()
        self.clock.now += self.publish_s
        if result.seq in self.fail_on:
            raise OSError("disk full")
        self.got.append(result.seq)

    async def aclose(self) -> None:
        pass


def sink_stats(metrics: Metrics) -> dict[str, object]:
    stats: dict[str, object] = metrics.snapshot()["sinks"]["files"]
    return stats


@pytest.mark.parametrize("on_full", ["block", "drop_oldest"])
async def test_route_reports_depth_capacity_and_publish_times(on_full: str) -> None:
    clock = Clock()
    metrics = Metrics(window_s=10.0, clock=clock, gpu_memory=lambda: None)
    sink = GatedSink(clock, publish_s=0.004, fail_on=frozenset({2}))
    route = SinkRoute(sink, name="files", capacity=8, on_full=on_full, metrics=metrics, clock=clock)
    assert sink_stats(metrics)["queue_capacity"] == 8  # listed as soon as the route exists

    runner = asyncio.create_task(route.run())
    for seq in range(6):
        await route.offer(make_result(seq, camera="a"), None)
    await asyncio.sleep(0)  # the runner takes the first result and waits at the gate
    stats = sink_stats(metrics)
    assert (stats["queue_depth"], stats["queue_depth_max"]) == (5, 6)  # one is being published

    sink.gate.set()
    await route.queue.join()
    stats = sink_stats(metrics)
    assert sink.got == [0, 1, 3, 4, 5]
    assert (stats["queue_depth"], stats["queue_depth_max"], stats["delivered"]) == (0, 6, 5)
    assert stats["errors"] == 1
    # Every call took 4 ms of the route's clock, the failed one included.
    assert stats["publish_ms_p50"] == pytest.approx(4.0) and stats["publish_ms_p95"] == pytest.approx(4.0)
    runner.cancel()
    await asyncio.wait({runner})


async def test_a_full_drop_oldest_queue_stays_at_capacity_and_counts_drops() -> None:
    clock = Clock()
    metrics = Metrics(window_s=10.0, clock=clock, gpu_memory=lambda: None)
    sink = GatedSink(clock, publish_s=0.0)
    route = SinkRoute(sink, name="files", capacity=3, on_full="drop_oldest", metrics=metrics, clock=clock)
    for seq in range(10):  # no runner: nothing is taken
        await route.offer(make_result(seq, camera="a"), None)
    stats = sink_stats(metrics)
    assert (stats["queue_depth"], stats["queue_depth_max"], stats["dropped"]) == (3, 3, 7)

    # Stopped without a drain: what is left is dropped and the depth goes back to zero.
    runner = asyncio.create_task(route.run())
    await asyncio.sleep(0)
    runner.cancel()
    await asyncio.wait({runner})
    stats = sink_stats(metrics)
    assert stats["queue_depth"] == 0 and stats["dropped"] + stats["delivered"] == 10
