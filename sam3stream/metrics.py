"""Runtime metrics: counters the pipeline updates, snapshots the reporter reads.

``Metrics`` is thread-safe (one lock, held only for a few dict/deque updates)
because the Prometheus endpoint reads it from its own HTTP thread while the
event loop keeps updating it. Times come from an injectable monotonic clock so
rates can be tested without sleeping.

Every camera and sink the pipeline is configured with is registered up front, so each of
their series exists (at zero) from the first scrape: a ``rate()`` over a counter that only
appears with its first event misses that event, and a healthy camera would show "no data".
"""

from __future__ import annotations

import asyncio
import errno
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from sam3stream.config import LISTEN_HOSTS
from sam3stream.errors import ConfigError
from sam3stream.gpu_memory import process_gpu_memory
from sam3stream.stream.frames import FrameResult

__all__ = [
    "Metrics",
    "Publisher",
    "Reporter",
    "SnapshotCollector",
    "log_fields",
    "percentile",
    "process_gpu_memory",
]

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
Publisher = Callable[[dict[str, Any]], Awaitable[None]]

STAGES = ("queue_wait", "preprocess", "vision", "decoder", "postprocess")


class _Rate:
    """Events per second over a sliding window and since the first event."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.times: deque[float] = deque()
        self.total = 0
        self.first: float | None = None

    def add(self, now: float, n: int = 1) -> None:
        if self.first is None:
            self.first = now
        self.total += n
        self.times.extend([now] * n)
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self.times and self.times[0] <= horizon:
            self.times.popleft()

    def recent(self, now: float) -> float:
        self._prune(now)
        if self.first is None:
            return 0.0
        # Early on the window is not full yet: divide by the time actually covered.
        span = min(self.window_s, now - self.first)
        return len(self.times) / span if span > 0 else 0.0

    def overall(self, now: float) -> float:
        if self.first is None or now <= self.first:
            return 0.0
        return self.total / (now - self.first)


@dataclass(slots=True)
class _Level:
    value: int
    end: float  # when the next change came; inf while it is the current level


class _WindowMax:
    """The highest level a value held at any moment of the last ``window_s`` seconds.

    A monotonic deque: levels that ended before the window leave at the front, levels a later
    higher one outdoes leave at the back, so it holds a few entries, not one per change.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.current = 0
        self._levels: deque[_Level] = deque()

    def set(self, now: float, value: int) -> None:
        if self._levels:
            self._levels[-1].end = now
        while self._levels and self._levels[-1].value <= value:
            self._levels.pop()
        self._levels.append(_Level(value, math.inf))
        self.current = value

    def peak(self, now: float) -> int:
        horizon = now - self.window_s
        while self._levels and self._levels[0].end <= horizon:
            self._levels.popleft()
        return self._levels[0].value if self._levels else self.current


@dataclass
class _Camera:
    decoded: _Rate
    processed: _Rate
    dropped: int = 0
    detections: int = 0
    state: str = "unknown"
    latency_ms: deque[float] = field(default_factory=deque)


@dataclass
class _BatchStats:
    count: int = 0
    stage_ms_sum: dict[str, float] = field(default_factory=dict)


@dataclass
class _SinkStats:
    depth: _WindowMax
    publish_ms: deque[float]
    capacity: int | None = None  # None: the sink was never registered with its queue
    delivered: int = 0
    errors: int = 0
    dropped: int = 0


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method), ``q`` in 0..100."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Metrics:
    """Counters for cameras, batches and sinks.

    ``window_s`` is the span of the "recent" rates and of a sink queue's peak depth (normally
    the report interval); ``latency_window`` bounds how many recent end-to-end latencies (and
    sink publish times) the percentiles are computed over. ``cameras`` and ``sinks`` are
    registered at once (see :meth:`register_camera`, :meth:`register_sink`).
    """

    def __init__(
        self,
        *,
        window_s: float = 10.0,
        latency_window: int = 2048,
        clock: Clock = time.monotonic,
        gpu_memory: Callable[[], int | None] | None = None,
        cameras: Iterable[str] = (),
        sinks: Iterable[str] = (),
    ) -> None:
        self._window_s = window_s
        self._latency_window = latency_window
        self._clock = clock
        self._gpu_memory = gpu_memory if gpu_memory is not None else process_gpu_memory
        self._started = clock()
        self._lock = threading.Lock()
        self._cameras: dict[str, _Camera] = {}
        self._batches: dict[int, _BatchStats] = {}
        self._sinks: dict[str, _SinkStats] = {}
        for camera in cameras:
            self.register_camera(camera)
        for sink in sinks:
            self.register_sink(sink)

    def _camera(self, camera: str) -> _Camera:
        cam = self._cameras.get(camera)
        if cam is None:
            cam = _Camera(
                decoded=_Rate(self._window_s),
                processed=_Rate(self._window_s),
                latency_ms=deque(maxlen=self._latency_window),
            )
            self._cameras[camera] = cam
        return cam

    def _sink(self, name: str) -> _SinkStats:
        stats = self._sinks.get(name)
        if stats is None:
            stats = _SinkStats(
                depth=_WindowMax(self._window_s), publish_ms=deque(maxlen=self._latency_window)
            )
            self._sinks[name] = stats
        return stats

    # ------------------------------------------------------------------ updates

    def register_camera(self, camera: str) -> None:
        """List ``camera`` now, at zero and in its initial state, before its first event."""
        with self._lock:
            self._camera(camera)

    def register_sink(self, name: str, capacity: int | None = None) -> None:
        """List sink ``name`` now, at zero; ``capacity`` is its queue's size (None: unknown)."""
        with self._lock:
            stats = self._sink(name)
            if capacity is not None:
                stats.capacity = capacity

    def frame_decoded(self, camera: str) -> None:
        now = self._clock()
        with self._lock:
            self._camera(camera).decoded.add(now)

    def frame_dropped(self, camera: str, n: int = 1) -> None:
        with self._lock:
            self._camera(camera).dropped += n

    def result(self, camera: str, result: FrameResult) -> None:
        now = self._clock()
        with self._lock:
            cam = self._camera(camera)
            cam.processed.add(now)
            cam.detections += len(result.detections)
            cam.latency_ms.append(result.timing.end_to_end)

    def batch(self, size: int, stage_ms: dict[str, float]) -> None:
        with self._lock:
            stats = self._batches.setdefault(size, _BatchStats())
            stats.count += 1
            for stage, ms in stage_ms.items():
                stats.stage_ms_sum[stage] = stats.stage_ms_sum.get(stage, 0.0) + ms

    def camera_state(self, camera: str, state: str) -> None:
        with self._lock:
            self._camera(camera).state = state

    def sink_error(self, sink_name: str) -> None:
        with self._lock:
            self._sink(sink_name).errors += 1

    def sink_dropped(self, sink_name: str, n: int) -> None:
        with self._lock:
            self._sink(sink_name).dropped += n

    def sink_queue_depth(self, sink_name: str, depth: int) -> None:
        """Results now waiting in the sink's queue (set on every change)."""
        now = self._clock()
        with self._lock:
            self._sink(sink_name).depth.set(now, depth)

    def sink_published(self, sink_name: str, publish_ms: float, *, delivered: bool = True) -> None:
        """One publish call took ``publish_ms``; ``delivered`` is False when it raised (a slow
        failure still holds the queue up, so its time counts in the percentiles)."""
        with self._lock:
            stats = self._sink(sink_name)
            stats.publish_ms.append(publish_ms)
            if delivered:
                stats.delivered += 1

    # ------------------------------------------------------------------ reads

    def snapshot(self) -> dict[str, Any]:
        """A plain, JSON-ready picture of everything (no live references)."""
        now = self._clock()
        with self._lock:
            cameras = {name: self._camera_snapshot(cam, now) for name, cam in sorted(self._cameras.items())}
            batches = {
                str(size): {
                    "count": b.count,
                    "stage_ms": {k: v / b.count for k, v in b.stage_ms_sum.items()},
                }
                for size, b in sorted(self._batches.items())
            }
            sinks = {name: self._sink_snapshot(s, now) for name, s in sorted(self._sinks.items())}
        # Outside the lock: NVML can take milliseconds.
        return {
            "uptime_s": now - self._started,
            "cameras": cameras,
            "batches": batches,
            "sinks": sinks,
            "gpu_memory_bytes": self._gpu_memory(),
        }

    @staticmethod
    def _camera_snapshot(cam: _Camera, now: float) -> dict[str, Any]:
        latencies = list(cam.latency_ms)
        return {
            "state": cam.state,
            "decode_fps": cam.decoded.recent(now),
            "decode_fps_avg": cam.decoded.overall(now),
            "fps": cam.processed.recent(now),
            "fps_avg": cam.processed.overall(now),
            "frames_decoded": cam.decoded.total,
            "frames_processed": cam.processed.total,
            "frames_dropped": cam.dropped,
            "detections": cam.detections,
            "latency_ms_p50": percentile(latencies, 50),
            "latency_ms_p95": percentile(latencies, 95),
        }

    @staticmethod
    def _sink_snapshot(sink: _SinkStats, now: float) -> dict[str, Any]:
        publish_ms = list(sink.publish_ms)
        return {
            "errors": sink.errors,
            "dropped": sink.dropped,
            "delivered": sink.delivered,
            # Waiting in the queue, not counting the one being published.
            "queue_depth": sink.depth.current,
            "queue_depth_max": sink.depth.peak(now),  # highest in the last window_s
            "queue_capacity": sink.capacity,
            "publish_ms_p50": percentile(publish_ms, 50),
            "publish_ms_p95": percentile(publish_ms, 95),
        }


# --------------------------------------------------------------------------- reporter


def _fmt(value: Any) -> Any:
    return round(value, 2) if isinstance(value, float) else value


def log_fields(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Flatten a snapshot into ``key=value`` fields for one log line."""
    fields: dict[str, Any] = {}
    for cam, c in snapshot["cameras"].items():
        fields[f"{cam}.state"] = c["state"]
        fields[f"{cam}.decode_fps"] = _fmt(c["decode_fps"])
        fields[f"{cam}.fps"] = _fmt(c["fps"])
        fields[f"{cam}.dropped"] = c["frames_dropped"]
        fields[f"{cam}.p50_ms"] = _fmt(c["latency_ms_p50"])
        fields[f"{cam}.p95_ms"] = _fmt(c["latency_ms_p95"])
    for size, b in snapshot["batches"].items():
        fields[f"batch{size}.count"] = b["count"]
    for name, s in snapshot["sinks"].items():
        fields[f"sink.{name}.errors"] = s["errors"]
        fields[f"sink.{name}.dropped"] = s["dropped"]
        fields[f"sink.{name}.depth"] = s["queue_depth"]
        fields[f"sink.{name}.p95_ms"] = _fmt(s["publish_ms_p95"])
    gpu = snapshot.get("gpu_memory_bytes")
    if gpu is not None:
        fields["gpu_mem_mb"] = round(gpu / 2**20, 1)
    return fields


class Reporter:
    """Every ``interval_s``: one ``stats`` log line, then each registered publisher.

    With ``prometheus_port`` set it also serves ``/metrics`` on ``prometheus_host`` (0 picks a
    free port; the bound one is in :attr:`prometheus_port` once bound). Bind it with
    ``with reporter:`` (or :meth:`open`) before anything else starts, so that a
    taken port (or an address no interface has) fails at once as a :class:`ConfigError` naming
    the key, not in the middle of a run; :meth:`run` then serves on that server (it binds
    itself if nobody did) and closes it when it ends.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        interval_s: float = 10.0,
        prometheus_port: int | None = None,
        prometheus_host: str = "0.0.0.0",
    ) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.prometheus_port = prometheus_port
        self.prometheus_host = prometheus_host
        self._publishers: list[tuple[str, Publisher]] = []
        self._server: Any = None
        self.serving = asyncio.Event()

    def add_publisher(self, name: str, publish: Publisher) -> None:
        """``publish(snapshot)`` is awaited every interval; ``name`` is for error counts."""
        self._publishers.append((name, publish))

    def open(self) -> None:
        """Bind and serve ``/metrics`` now (nothing without a port, or when already open).

        Raises :class:`ConfigError` at ``metrics.prometheus_port`` when the port cannot be
        bound or prometheus-client is missing, at ``metrics.prometheus_host`` when the host is
        no local address or does not resolve.
        """
        if self.prometheus_port is not None and self._server is None:
            self._server = self._serve_prometheus(self.prometheus_port)

    def close(self) -> None:
        """Stop serving ``/metrics`` (idempotent). Blocks up to the server's 0.5 s poll: on the
        event loop, use :meth:`aclose`."""
        server, self._server = self._server, None
        if server is not None:
            _stop_server(server)

    async def aclose(self) -> None:
        """:meth:`close` off the event loop, which would otherwise stall during a stop."""
        server, self._server = self._server, None
        if server is not None:
            # Shielded: a second cancel must not leave the port bound for the next start.
            await asyncio.shield(asyncio.to_thread(_stop_server, server))

    def __enter__(self) -> Reporter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        # Also covers a run() task cancelled before its first step, whose own finally never runs.
        self.close()

    async def run(self) -> None:
        try:
            # Binding is quick and not awaited: a cancel cannot leave a server nobody closes.
            self.open()
            self.serving.set()
            while True:
                await asyncio.sleep(self.interval_s)
                await self.report()
        finally:
            await self.aclose()

    async def report(self) -> dict[str, Any]:
        """Log and publish one snapshot now (also what each tick of :meth:`run` does)."""
        snap = await asyncio.to_thread(self.metrics.snapshot)
        log.info("stats", **log_fields(snap))
        for name, publish in self._publishers:
            try:
                await publish(snap)
            except Exception as exc:
                # A failing publisher must not stop the stats, but it is counted.
                self.metrics.sink_error(name)
                log.warning("stats_publish_failed", sink=name, error=repr(exc))
        return snap

    def _serve_prometheus(self, port: int) -> Any:
        try:
            # Imported here: prometheus-client is an optional dependency.
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            problem = "serving metrics needs prometheus-client: pip install 'sam3stream[prometheus]'"
            raise ConfigError([(_PORT_KEY, f"{problem}, or remove the key")]) from None

        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(self.metrics))
        try:
            server, _thread = start_http_server(port, addr=self.prometheus_host, registry=registry)
        except OSError as exc:
            # Not a traceback: the fix is in the config (or in whatever else holds the port).
            raise ConfigError([_bind_problem(port, self.prometheus_host, exc)]) from exc
        self.prometheus_port = int(server.server_port)
        log.info("prometheus_serving", host=self.prometheus_host, port=self.prometheus_port)
        return server


_PORT_KEY = "metrics.prometheus_port"
_HOST_KEY = "metrics.prometheus_host"


def _stop_server(server: Any) -> None:
    server.shutdown()  # returns after serve_forever's next poll, up to 0.5 s
    server.server_close()


def _bind_problem(port: int, host: str, exc: OSError) -> tuple[str, str]:
    """The config key to blame and what to say: the host when it is the problem, else the port."""
    if isinstance(exc, socket.gaierror):
        return _HOST_KEY, f"{host!r} does not resolve ({exc.strerror or exc}); {LISTEN_HOSTS}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return _HOST_KEY, f"{host}: no network interface of this machine has that address; {LISTEN_HOSTS}"
    if exc.errno == errno.EAFNOSUPPORT:
        return _HOST_KEY, f"{host}: this machine does not support that address family; {LISTEN_HOSTS}"
    if exc.errno == errno.EADDRINUSE:
        return _PORT_KEY, (
            f"{port}: address already in use on {host}; choose a free port, or stop the process "
            f"that holds it (`ss -ltnp 'sport = :{port}'` names it)"
        )
    if exc.errno == errno.EACCES:
        return (
            _PORT_KEY,
            f"{port}: permission denied on {host}; ports below 1024 need privileges, choose a higher one",
        )
    return _PORT_KEY, f"{port}: cannot listen on {host}: {exc.strerror or exc}"


class SnapshotCollector:
    """A Prometheus collector that turns one fresh :meth:`Metrics.snapshot` into metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.metrics.snapshot()
        cams = snap["cameras"]

        def per_camera(family: Any, key: str) -> Any:
            return _per_row(family, cams, key)

        yield per_camera(
            GaugeMetricFamily("sam3stream_decode_fps", "Decoded frames/s, recent window", labels=["camera"]),
            "decode_fps",
        )
        yield per_camera(
            GaugeMetricFamily("sam3stream_fps", "Processed frames/s, recent window", labels=["camera"]), "fps"
        )
        yield per_camera(
            CounterMetricFamily("sam3stream_frames_decoded", "Frames decoded", labels=["camera"]),
            "frames_decoded",
        )
        yield per_camera(
            CounterMetricFamily("sam3stream_frames_processed", "Frames with a result", labels=["camera"]),
            "frames_processed",
        )
        yield per_camera(
            CounterMetricFamily(
                "sam3stream_frames_dropped", "Frames dropped before inference", labels=["camera"]
            ),
            "frames_dropped",
        )
        yield per_camera(
            CounterMetricFamily("sam3stream_detections", "Detections published", labels=["camera"]),
            "detections",
        )

        yield _percentiles(
            "sam3stream_latency_ms",
            "End-to-end latency percentiles over recent results",
            "camera",
            cams,
            "latency_ms",
        )

        state = GaugeMetricFamily(
            "sam3stream_camera_state", "1 for the camera's current state", labels=["camera", "state"]
        )
        for cam, c in cams.items():
            state.add_metric([cam, c["state"]], 1)
        yield state

        batches = CounterMetricFamily("sam3stream_batches", "Batches run, by size", labels=["size"])
        stage = GaugeMetricFamily(
            "sam3stream_batch_stage_ms", "Mean stage time per batch size", labels=["size", "stage"]
        )
        for size, b in snap["batches"].items():
            batches.add_metric([size], b["count"])
            for name, ms in b["stage_ms"].items():
                stage.add_metric([size, name], ms)
        yield batches
        yield stage

        yield from _sink_families(snap["sinks"])

        if snap["gpu_memory_bytes"] is not None:
            yield GaugeMetricFamily(
                "sam3stream_gpu_memory_bytes",
                "GPU memory held by this process",
                value=snap["gpu_memory_bytes"],
            )


def _sink_families(sinks: dict[str, dict[str, Any]]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def per_sink(family: Any, key: str) -> Any:
        return _per_row(family, sinks, key)

    yield per_sink(CounterMetricFamily("sam3stream_sink_errors", "Sink errors", labels=["sink"]), "errors")
    yield per_sink(
        CounterMetricFamily("sam3stream_sink_dropped", "Results a sink dropped", labels=["sink"]), "dropped"
    )
    yield per_sink(
        CounterMetricFamily("sam3stream_sink_delivered", "Results a sink took", labels=["sink"]), "delivered"
    )
    yield per_sink(
        GaugeMetricFamily("sam3stream_sink_queue_depth", "Results waiting for the sink", labels=["sink"]),
        "queue_depth",
    )
    yield per_sink(
        GaugeMetricFamily(
            "sam3stream_sink_queue_depth_max",
            "Highest queue depth over the last report interval",
            labels=["sink"],
        ),
        "queue_depth_max",
    )
    yield per_sink(
        GaugeMetricFamily("sam3stream_sink_queue_capacity", "Size of the sink's queue", labels=["sink"]),
        "queue_capacity",
    )
    yield _percentiles(
        "sam3stream_sink_publish_ms",
        "Time a sink's publish call takes, percentiles over recent results",
        "sink",
        sinks,
        "publish_ms",
    )


def _per_row(family: Any, rows: dict[str, dict[str, Any]], key: str) -> Any:
    """``family`` with each row's ``key`` under the row's name (a row with no figure: no series)."""
    for row_name, row in rows.items():
        if row[key] is not None:
            family.add_metric([row_name], row[key])
    return family


def _percentiles(name: str, documentation: str, label: str, rows: dict[str, dict[str, Any]], key: str) -> Any:
    """A gauge of each row's ``{key}_p50`` and ``{key}_p95`` as quantiles 0.5 and 0.95 (a row with
    no figure yet has no series)."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, documentation, labels=[label, "quantile"])
    for row_name, row in rows.items():
        for q, p in (("0.5", 50), ("0.95", 95)):
            if row[f"{key}_p{p}"] is not None:
                family.add_metric([row_name, q], row[f"{key}_p{p}"])
    return family
