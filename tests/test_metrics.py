from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import numpy as np
import pytest
import structlog

from sam3stream.metrics import Metrics, Reporter, log_fields, percentile
from sam3stream.stream.frames import FrameResult, StageTimes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def result(camera: str, latency_ms: float) -> FrameResult:
    return FrameResult(
        camera=camera,
        seq=0,
        pts=None,
        stream_time=None,
        capture_time=0.0,
        width=4,
        height=4,
        detections=[],
        timing=StageTimes(end_to_end=latency_ms),
    )


def no_gpu() -> int | None:
    return None


def test_percentiles_match_numpy() -> None:
    rng = np.random.default_rng(1)
    values = rng.exponential(30.0, size=501).tolist()
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0


def test_fps_recent_and_since_start_with_a_controlled_clock() -> None:
    clock = FakeClock()
    m = Metrics(window_s=10.0, clock=clock, gpu_memory=no_gpu)
    # 20 s at 30 decoded / 10 processed frames per second...
    # (times computed, not accumulated, so window edges are exact)
    for k in range(1, 20 * 30 + 1):
        clock.now = 1000.0 + k / 30
        m.frame_decoded("a")
        if k % 3 == 0:
            m.result("a", result("a", 40.0))
    # ...then 10 s where processing doubles to 20 fps.
    for k in range(1, 10 * 20 + 1):
        clock.now = 1020.0 + k / 20
        m.result("a", result("a", 40.0))

    cam = m.snapshot()["cameras"]["a"]
    assert cam["fps"] == pytest.approx(20.0, rel=0.02)  # the last 10 s only
    assert cam["fps_avg"] == pytest.approx((200 + 200) / 30, rel=0.02)
    assert cam["decode_fps"] == 0.0  # nothing decoded in the last window
    assert cam["decode_fps_avg"] == pytest.approx(600 / 30, rel=0.02)
    assert (cam["frames_decoded"], cam["frames_processed"]) == (600, 400)


def test_recent_rate_before_the_window_fills() -> None:
    clock = FakeClock()
    m = Metrics(window_s=10.0, clock=clock, gpu_memory=no_gpu)
    for _ in range(50):
        clock.now += 0.1
        m.frame_decoded("a")
    # 5 s of data in a 10 s window: still 10 fps, not 5.
    assert m.snapshot()["cameras"]["a"]["decode_fps"] == pytest.approx(10.0, rel=0.03)


def test_latency_drops_batches_sinks_and_state() -> None:
    clock = FakeClock()
    m = Metrics(latency_window=100, clock=clock, gpu_memory=no_gpu)
    for ms in range(1, 1001):  # only the last 100 (901..1000) count
        m.result("a", result("a", float(ms)))
    m.frame_dropped("a")
    m.frame_dropped("a", 4)
    m.camera_state("a", "reconnecting")
    m.batch(4, {"vision": 10.0, "decoder": 4.0})
    m.batch(4, {"vision": 20.0, "decoder": 6.0})
    m.batch(1, {"vision": 3.0})
    m.sink_error("mqtt")
    m.sink_dropped("mqtt", 7)
    m.sink_dropped("mqtt", 3)

    snap = m.snapshot()
    cam = snap["cameras"]["a"]
    assert cam["latency_ms_p50"] == pytest.approx(950.5)
    assert cam["latency_ms_p95"] == pytest.approx(float(np.percentile(np.arange(901, 1001), 95)))
    assert cam["frames_dropped"] == 5
    assert cam["state"] == "reconnecting"
    assert snap["batches"] == {
        "1": {"count": 1, "stage_ms": {"vision": 3.0}},
        "4": {"count": 2, "stage_ms": {"vision": 15.0, "decoder": 5.0}},
    }
    sink = snap["sinks"]["mqtt"]
    assert (sink["errors"], sink["dropped"], sink["delivered"]) == (1, 10, 0)
    assert snap["gpu_memory_bytes"] is None


def test_registered_cameras_and_sinks_are_listed_at_zero_before_any_event() -> None:
    # A Prometheus rate() over a series that first appears with its first event misses it.
    m = Metrics(clock=FakeClock(), gpu_memory=no_gpu, cameras=["door"], sinks=["files"])
    m.register_sink("bus", capacity=32)
    snap = m.snapshot()
    door = snap["cameras"]["door"]
    assert (door["frames_decoded"], door["frames_dropped"], door["fps"]) == (0, 0, 0.0)
    assert door["state"] == m.snapshot()["cameras"]["door"]["state"]
    assert set(snap["sinks"]) == {"files", "bus"}
    bus = snap["sinks"]["bus"]
    assert (bus["errors"], bus["dropped"], bus["delivered"], bus["queue_depth"]) == (0, 0, 0, 0)
    assert bus["queue_capacity"] == 32 and snap["sinks"]["files"]["queue_capacity"] is None
    assert bus["publish_ms_p95"] is None  # nothing published yet: no figure, not 0


def test_sink_queue_depth_peak_covers_the_window_and_then_expires() -> None:
    clock = FakeClock()
    m = Metrics(window_s=10.0, clock=clock, gpu_memory=no_gpu, sinks=["s"])

    def depth_at(t: float) -> tuple[int, int]:
        clock.now = 1000.0 + t
        s = m.snapshot()["sinks"]["s"]
        return s["queue_depth"], s["queue_depth_max"]

    for t, level in [(0.0, 3), (1.0, 9), (2.0, 4), (3.0, 1)]:
        clock.now = 1000.0 + t
        m.sink_queue_depth("s", level)
    assert depth_at(11.9) == (1, 9)  # 9 held until 1002: inside the last 10 s
    assert depth_at(12.1) == (1, 4)  # 9 has left the window; 4 held until 1003
    assert depth_at(13.1) == (1, 1)
    clock.now = 1013.5
    m.sink_queue_depth("s", 2)
    assert depth_at(13.6) == (2, 2)
    assert depth_at(100.0) == (2, 2)  # the current level counts however long it holds


def test_sink_publish_times_and_deliveries() -> None:
    m = Metrics(latency_window=100, clock=FakeClock(), gpu_memory=no_gpu)
    for ms in range(1, 201):  # the last 100 (101..200) count
        m.sink_published("s", float(ms))
    m.sink_published("s", 5000.0, delivered=False)  # a slow failure holds the queue up too
    s = m.snapshot()["sinks"]["s"]
    assert s["delivered"] == 200
    times = [*range(102, 201), 5000]
    assert s["publish_ms_p50"] == pytest.approx(float(np.percentile(times, 50)))
    assert s["publish_ms_p95"] == pytest.approx(float(np.percentile(times, 95)))


def test_log_fields_are_flat_key_values() -> None:
    m = Metrics(gpu_memory=lambda: 3 * 2**20)
    m.result("door", result("door", 12.5))
    m.sink_dropped("mqtt", 2)
    fields = log_fields(m.snapshot())
    assert fields["door.p50_ms"] == 12.5
    assert fields["sink.mqtt.dropped"] == 2
    assert fields["sink.mqtt.depth"] == 0
    assert fields["gpu_mem_mb"] == 3.0
    assert all(not isinstance(v, dict | list) for v in fields.values())


async def test_reporter_logs_and_publishes_and_counts_failures() -> None:
    m = Metrics(gpu_memory=no_gpu)
    m.result("a", result("a", 5.0))
    got: list[dict[str, Any]] = []

    async def good(snap: dict[str, Any]) -> None:
        got.append(snap)

    async def bad(snap: dict[str, Any]) -> None:
        raise ConnectionError("broker gone")

    reporter = Reporter(m, interval_s=0.05)
    reporter.add_publisher("good", good)
    reporter.add_publisher("broken", bad)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(reporter.run())
        async with asyncio.timeout(5):
            while len(got) < 2:  # noqa: ASYNC110 - waits on the reporter's own ticks
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait({task})
    assert got[0]["cameras"]["a"]["frames_processed"] == 1
    stats = [e for e in logs if e["event"] == "stats"]
    assert stats and stats[0]["a.p50_ms"] == 5.0
    assert m.snapshot()["sinks"]["broken"]["errors"] >= 2


async def test_prometheus_endpoint_serves_metric_names() -> None:
    pytest.importorskip("prometheus_client")
    m = Metrics(gpu_memory=lambda: 123456)
    m.frame_decoded("gate")
    m.result("gate", result("gate", 33.0))
    m.frame_dropped("gate", 2)
    m.camera_state("gate", "running")
    m.batch(2, {"vision": 9.0})
    m.sink_dropped("mqtt", 5)
    m.register_sink("files", capacity=64)  # registered, nothing happened yet: series at zero
    m.register_camera("yard")
    m.sink_queue_depth("mqtt", 3)
    m.sink_published("mqtt", 2.0)
    reporter = Reporter(m, interval_s=60, prometheus_port=0, prometheus_host="127.0.0.1")
    task = asyncio.create_task(reporter.run())
    try:
        await asyncio.wait_for(reporter.serving.wait(), 5)
        url = f"http://127.0.0.1:{reporter.prometheus_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        task.cancel()
        await asyncio.wait({task})
    for line in (
        'sam3stream_frames_decoded_total{camera="gate"} 1.0',
        'sam3stream_frames_dropped_total{camera="gate"} 2.0',
        'sam3stream_latency_ms{camera="gate",quantile="0.5"} 33.0',
        'sam3stream_camera_state{camera="gate",state="running"} 1.0',
        'sam3stream_batches_total{size="2"} 1.0',
        'sam3stream_batch_stage_ms{size="2",stage="vision"} 9.0',
        'sam3stream_sink_dropped_total{sink="mqtt"} 5.0',
        'sam3stream_sink_delivered_total{sink="mqtt"} 1.0',
        'sam3stream_sink_queue_depth{sink="mqtt"} 3.0',
        'sam3stream_sink_queue_depth_max{sink="mqtt"} 3.0',
        'sam3stream_sink_publish_ms{quantile="0.95",sink="mqtt"} 2.0',
        'sam3stream_sink_dropped_total{sink="files"} 0.0',
        'sam3stream_sink_queue_capacity{sink="files"} 64.0',
        'sam3stream_frames_dropped_total{camera="yard"} 0.0',
        "sam3stream_gpu_memory_bytes 123456.0",
    ):
        assert line in body
    assert "sam3stream_fps{" in body and "sam3stream_decode_fps{" in body
    assert 'sam3stream_sink_publish_ms{quantile="0.5",sink="files"}' not in body  # no figure yet
