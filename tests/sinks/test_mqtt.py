"""MqttSink against a real Mosquitto broker on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import msgspec
import pytest
import structlog

from sam3stream.backoff import backoff_delay
from sam3stream.metrics import Metrics
from sam3stream.sinks.mqtt import MqttSink
from sam3stream.stream.frames import SCHEMA_VERSION, FrameResult
from tests.mosquitto import Mosquitto
from tests.sinks.results import make_result

pytestmark = pytest.mark.mqtt

REPO = Path(__file__).resolve().parents[2]


class Subscriber:
    """Collects every message under a topic filter, in arrival order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, bytes, bool]] = []
        self._changed = asyncio.Event()

    async def run(self) -> None:
        async for msg in self.client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            self.messages.append((str(msg.topic), payload, bool(msg.retain)))
            self._changed.set()

    def on(self, topic: str) -> list[bytes]:
        return [p for t, p, _ in self.messages if t == topic]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def subscribed(broker: Mosquitto, topic: str) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(topic, qos=1)
        sub = Subscriber(client)
        task = asyncio.create_task(sub.run())
        try:
            yield sub
        finally:
            task.cancel()
            await asyncio.wait({task})


async def retained(broker: Mosquitto, topic: str) -> bytes | None:
    """The retained message on ``topic`` as a fresh client sees it (None if there is none)."""
    async with subscribed(broker, topic) as sub:
        try:
            await sub.wait_for(lambda: bool(sub.on(topic)), within=1.0)
        except TimeoutError:
            return None
        return sub.on(topic)[-1]


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    # Polls: the sink's connection state has no event to wait on.
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def seqs(payloads: list[bytes]) -> list[int]:
    return [msgspec.json.decode(p, type=FrameResult).seq for p in payloads]


def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def max_jitter(lo: float, hi: float) -> float:
    # Deterministic backoff for tests: always the top of the jitter range.
    return hi


def test_backoff_is_jittered_exponential_and_capped() -> None:
    assert backoff_delay(0, 0.5, 30.0, max_jitter) == 0.5
    assert backoff_delay(3, 0.5, 30.0, max_jitter) == 4.0
    assert backoff_delay(10, 0.5, 30.0, max_jitter) == 30.0
    assert backoff_delay(10_000, 0.5, 30.0, max_jitter) == 30.0
    delays = [backoff_delay(4, 0.5, 30.0) for _ in range(200)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 150  # really random, not a fixed schedule


@pytest.mark.parametrize("qos", [0, 1])
async def test_detections_status_stats_and_availability(mosquitto: Mosquitto, qos: int) -> None:
    p = prefix()
    sink = MqttSink(mosquitto.host, mosquitto.port, prefix=p, qos=qos, stats_interval_s=0.01)
    async with subscribed(mosquitto, f"{p}/#") as sub:
        await sink.start()
        await sub.wait_for(lambda: sub.on(f"{p}/available") == [b"online"])

        sent = [make_result(i, camera="front") for i in range(200)]
        for r in sent:
            await sink.publish(r)
        await sink.publish_status("front", "running", None)
        await sink.publish_stats({"cameras": {"front": {"fps": 12.5}}})
        topic = f"{p}/front/detections"
        await sub.wait_for(lambda: len(sub.on(topic)) >= 200 and bool(sub.on(f"{p}/stats")))

        got = [msgspec.json.decode(x, type=FrameResult) for x in sub.on(topic)]
        assert got == sent  # exactly N, in order, unchanged
        assert all(msgspec.json.decode(x)["schema"] == SCHEMA_VERSION for x in sub.on(topic))
        stats = msgspec.json.decode(sub.on(f"{p}/stats")[0])
        assert stats == {"schema": SCHEMA_VERSION, "cameras": {"front": {"fps": 12.5}}}
        status = msgspec.json.decode(sub.on(f"{p}/front/status")[0])
        assert (status["schema"], status["camera"], status["state"]) == (SCHEMA_VERSION, "front", "running")

        await sink.aclose()
        await sub.wait_for(lambda: sub.on(f"{p}/available") == [b"online", b"offline"])

    assert sink.dropped == 0
    # Both availability and status are retained for clients that come later.
    assert await retained(mosquitto, f"{p}/available") == b"offline"
    late_status = await retained(mosquitto, f"{p}/front/status")
    assert late_status is not None and msgspec.json.decode(late_status)["state"] == "running"


class Records(logging.Handler):
    """Keeps what a stdlib logger emits (these tests run with pytest's logging plugin off)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_qos1_burst_keeps_aiomqtt_quiet(mosquitto: Mosquitto) -> None:
    # A full window of unacknowledged publishes is normal for this sink; aiomqtt's default
    # threshold (10) would log "There are N pending publish calls." at every burst.
    p = prefix()
    global_logger = logging.getLogger("mqtt")  # aiomqtt's default: nothing may reach it now
    everywhere = Records()
    global_logger.addHandler(everywhere)
    sink = MqttSink(mosquitto.host, mosquitto.port, prefix=p, qos=1)
    own = Records()
    sink._client_logger.addHandler(own)  # the client's logger is the sink's own
    try:
        async with subscribed(mosquitto, f"{p}/#") as sub:
            await sink.start()
            await wait_until(lambda: sink.connected)
            for i in range(500):
                await sink.publish(make_result(i, camera="front"))
            topic = f"{p}/front/detections"
            await sub.wait_for(lambda: len(sub.on(topic)) >= 500, within=10)
            await sink.aclose()
    finally:
        global_logger.removeHandler(everywhere)
    assert sink.dropped == 0
    assert [r.getMessage() for r in own.records] == []
    assert [r.getMessage() for r in everywhere.records if r.levelno >= logging.WARNING] == []


async def test_last_will_when_the_process_dies(mosquitto: Mosquitto) -> None:
    p = prefix()
    script = (
        "import asyncio, sys\n"
        "from sam3stream.sinks.mqtt import MqttSink\n"
        "async def main():\n"
        f"    sink = MqttSink('127.0.0.1', {mosquitto.port}, prefix='{p}', keepalive=60)\n"
        "    await sink.start()\n"
        "    while not sink.connected:\n"
        "        await asyncio.sleep(0.01)\n"
        "    await asyncio.sleep(0.2)\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            # The sink's own log lines come first.
            while (line := await proc.stdout.readline()) != b"ready\n":
                assert line, "sink process exited before it connected"
        assert await retained(mosquitto, f"{p}/available") == b"online"
        # No clean disconnect, no "offline" from the sink itself: only the broker's will.
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        deadline = time.monotonic() + 5
        while await retained(mosquitto, f"{p}/available") != b"offline":
            assert time.monotonic() < deadline, "last will never published"
            await asyncio.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_broker_down_at_start_buffers_up_to_bound(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    p = prefix()
    metrics = Metrics()
    # Fixed 1.5 s between attempts: the subscriber is in place long before the sink gets in.
    sink = MqttSink(
        mosquitto.host,
        mosquitto.port,
        name="bus",
        prefix=p,
        qos=1,
        buffer=10,
        reconnect_base_s=1.5,
        reconnect_cap_s=1.5,
        uniform=max_jitter,
        metrics=metrics,
    )
    await sink.start()
    try:
        await wait_until(lambda: sink.connect_failures >= 1)
        t0 = time.monotonic()
        for i in range(25):
            await sink.publish(make_result(i))
        assert time.monotonic() - t0 < 0.5  # publish never waits for the broker
        assert (sink.buffered, sink.dropped) == (10, 15)
        assert metrics.snapshot()["sinks"]["bus"]["dropped"] == 15

        mosquitto.start()
        async with subscribed(mosquitto, f"{p}/#") as sub:
            topic = f"{p}/cam1/detections"
            await sub.wait_for(lambda: len(sub.on(topic)) >= 10, within=10)
            await asyncio.sleep(0.2)  # nothing more should trickle in
            assert seqs(sub.on(topic)) == list(range(15, 25))  # the newest, oldest dropped, in order
            assert sub.on(f"{p}/available")[-1] == b"online"
    finally:
        await sink.aclose()
    assert sink.dropped == 15


async def test_broker_restart_mid_run_resumes_delivery(mosquitto: Mosquitto) -> None:
    p = prefix()
    sink = MqttSink(
        mosquitto.host,
        mosquitto.port,
        prefix=p,
        qos=1,
        reconnect_base_s=1.0,
        reconnect_cap_s=1.0,
        uniform=max_jitter,
    )
    topic = f"{p}/cam1/detections"
    await sink.start()
    try:
        async with subscribed(mosquitto, f"{p}/#") as sub:
            for i in range(5):
                await sink.publish(make_result(i))
            await sub.wait_for(lambda: len(sub.on(topic)) == 5)
        await sink.publish_status("cam1", "running", "since start")

        mosquitto.stop()
        await wait_until(lambda: not sink.connected)
        for i in range(5, 12):
            await sink.publish(make_result(i))  # buffered while the broker is away

        mosquitto.start()  # no persistence: retained state is gone with the old broker
        async with subscribed(mosquitto, f"{p}/#") as sub:
            await sub.wait_for(lambda: len(sub.on(topic)) >= 7, within=10)
            for i in range(12, 15):
                await sink.publish(make_result(i))
            await sub.wait_for(lambda: len(sub.on(topic)) >= 10)
            assert seqs(sub.on(topic)) == list(range(5, 15))
            # Availability and the camera's status are republished after the reconnect.
            await sub.wait_for(lambda: bool(sub.on(f"{p}/cam1/status")))
            assert sub.on(f"{p}/available")[-1] == b"online"
        assert sink.connects == 2 and sink.dropped == 0
    finally:
        await sink.aclose()
    assert await retained(mosquitto, f"{p}/available") == b"offline"


async def test_close_is_bounded_when_the_broker_hangs(mosquitto: Mosquitto) -> None:
    assert mosquitto.proc is not None
    sink = MqttSink(mosquitto.host, mosquitto.port, qos=1, op_timeout_s=1.0, close_timeout_s=0.5)
    await sink.start()
    await wait_until(lambda: sink.connected)
    # A frozen broker: TCP stays up (the kernel still answers), acknowledgements never come.
    mosquitto.proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(10):
            await sink.publish(make_result(i))
        t0 = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            await sink.aclose()
        assert time.monotonic() - t0 < 4.0
        assert sink.dropped == 10  # none acknowledged: all counted as lost
        # Undelivered, not an overflow: the buffer (1000) was never full.
        undelivered = [e for e in logs if e["event"] == "mqtt_undelivered_at_close"]
        assert [e["results"] for e in undelivered] == [10]
        assert not [e for e in logs if e["event"] == "mqtt_buffer_full"]
    finally:
        mosquitto.proc.send_signal(signal.SIGCONT)


async def test_close_without_broker_counts_undelivered(tmp_path: Path) -> None:
    from tests.mosquitto import free_port

    metrics = Metrics()
    sink = MqttSink("127.0.0.1", free_port(), name="bus", buffer=100, metrics=metrics)
    await sink.start()
    for i in range(7):
        await sink.publish(make_result(i))
    with structlog.testing.capture_logs() as logs:
        await sink.aclose()
    assert sink.dropped == 7
    events = {e["event"]: e for e in logs}
    assert events["mqtt_undelivered_at_close"]["results"] == 7
    assert "mqtt_buffer_full" not in events  # 7 of 100: the buffer never overflowed
    assert metrics.snapshot()["sinks"]["bus"]["dropped"] == 7
