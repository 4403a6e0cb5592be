"""MQTT: per-frame detections, retained camera status and availability, periodic stats.

Topics (``<p>`` is the configured prefix):

- ``<p>/available``: ``online`` / ``offline``, retained; ``offline`` is also the
  connection's last will, so it appears when the process dies or the network goes.
- ``<p>/<camera>/detections``: one FrameResult as JSON per frame.
- ``<p>/<camera>/status``: retained camera state changes.
- ``<p>/stats``: the metrics snapshot, every ``stats_interval_s``.

JSON payloads carry ``"schema": SCHEMA_VERSION``. A prefix belongs to one pipeline: on its first
connection the sink clears the retained status of cameras it does not serve (cameras removed
from the config), see :mod:`sam3stream.sinks.mqtt_status_sweep`.

With ``tls`` the connection is TLS, verified against ``ca_file`` (or the system's CAs), with a
client certificate where one is given; the context is built from the files at each connection,
so a renewed certificate is picked up at the next reconnect.

``publish()`` never waits for the broker: it appends to a bounded buffer that a
background task drains. While the broker is unreachable the task reconnects with
jittered exponential backoff and the buffer keeps the newest ``buffer`` results;
older ones are dropped and counted. With QoS 1/2 delivery is at-least-once
across a reconnect (a batch that was in flight when the connection broke is
sent again); with QoS 0, as with any QoS 0 client, what was written to a
connection just before it broke can be lost unnoticed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiomqtt
import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.backoff import backoff_delay
from sam3stream.outage import Outage
from sam3stream.sinks.mqtt_status_sweep import StatusSweep
from sam3stream.stream.frames import SCHEMA_VERSION, FrameResult
from sam3stream.tls import TlsFileError, client_context

if TYPE_CHECKING:
    from sam3stream.config import MqttSinkConfig
    from sam3stream.metrics import Metrics

__all__ = ["MqttSink"]

log = structlog.get_logger(__name__)

# Results published concurrently per round trip: QoS 1/2 acknowledgements would
# otherwise cap throughput at one message per broker round trip.
WINDOW = 64
# aiomqtt warns (through stdlib logging, bypassing our structured logs) past this many
# unacknowledged calls. A full window is normal here; on top of it come at most the
# "offline" publish at close and a status or stats message.
PENDING_CALLS_THRESHOLD = 2 * WINDOW


class _ClientLog(logging.Handler):
    """What paho and aiomqtt log for one sink: kept, not printed. The reason a connection failed
    is often only there (a broker that wants a client certificate ends the TLS session after the
    handshake, and the connect just times out), so the failure event carries the last of it."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()

    def take(self) -> str | None:
        last, self.last = self.last, None
        return last


class MqttSink:
    """Publishes results to an MQTT broker; see the module docstring for topics."""

    # Never: publish() does not wait for the broker, and an outage drops the oldest
    # results past ``buffer`` (config rejects on_full = "block" for this sink).
    lossless = False
    wants_images = False

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        name: str = "mqtt",
        prefix: str = "sam3stream",
        qos: int = 0,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        buffer: int = 1000,
        stats_interval_s: float = 10.0,
        keepalive: int = 60,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        tls_insecure: bool = False,
        cameras: Iterable[str] = (),
        clear_stale_status: bool = True,
        reconnect_base_s: float = 0.5,
        reconnect_cap_s: float = 30.0,
        op_timeout_s: float = 5.0,
        close_timeout_s: float = 3.0,
        metrics: Metrics | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.prefix = prefix.rstrip("/")
        self.qos = qos
        self.client_id = client_id
        self.username = username
        self.password = password
        self.buffer = buffer
        self.stats_interval_s = stats_interval_s
        self.keepalive = keepalive
        self.tls = tls
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.tls_insecure = tls_insecure
        self.reconnect_base_s = reconnect_base_s
        self.reconnect_cap_s = reconnect_cap_s
        self.op_timeout_s = op_timeout_s  # connect, acknowledgements, disconnect
        self.close_timeout_s = close_timeout_s  # aclose: flushing the buffer and "offline"
        self.dropped = 0  # results lost to buffer overflow or undelivered at close (also in metrics)
        self.connects = 0  # successful connections so far
        self.connect_failures = 0  # failed connection attempts and lost connections
        self._metrics = metrics
        self._uniform = uniform
        self._clock = clock
        self._encoder = msgspec.json.Encoder()

        self._results: deque[tuple[str, bytes]] = deque()
        self._status: dict[str, bytes] = {}  # latest per camera, re-sent on every connect
        self._status_dirty: set[str] = set()
        self._stats: bytes | None = None
        self._stats_last: float | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing is waiting to be sent
        self._idle.set()
        self._client: aiomqtt.Client | None = None  # set while connected
        self._task: asyncio.Task[None] | None = None
        self._overflowing = False
        self._outage = Outage(clock=clock)
        # A logger of its own, outside logging's tree: paho's lines would otherwise reach
        # stderr unformatted (logging's last resort), at every retry of a broker that is down.
        self._client_log = _ClientLog()
        self._client_logger = logging.Logger(f"sam3stream.sinks.mqtt.client.{name}", logging.WARNING)
        self._client_logger.addHandler(self._client_log)
        served = list(cameras)
        # Without the list of cameras served, every retained status would look stale: no sweep.
        self._sweep = (
            StatusSweep(self.prefix, served, sink=name, qos=qos, timeout_s=op_timeout_s)
            if clear_stale_status and served
            else None
        )

    @classmethod
    def from_config(
        cls,
        cfg: MqttSinkConfig,
        *,
        name: str,
        metrics: Metrics | None = None,
        cameras: Iterable[str] = (),
    ) -> MqttSink:
        """``cameras``: those this sink publishes for (its ``cameras``, else all of the config's)."""
        return cls(
            cfg.host,
            cfg.broker_port,
            name=name,
            prefix=cfg.prefix,
            qos=cfg.qos,
            client_id=cfg.client_id,
            username=cfg.username,
            password=cfg.password,
            buffer=cfg.buffer,
            stats_interval_s=cfg.stats_interval_s,
            keepalive=cfg.keepalive,
            tls=cfg.tls,
            ca_file=cfg.ca_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            tls_insecure=cfg.tls_insecure,
            cameras=cfg.cameras or cameras,
            clear_stale_status=cfg.clear_stale_status,
            metrics=metrics,
        )

    # ------------------------------------------------------------------ topics

    @property
    def available_topic(self) -> str:
        return f"{self.prefix}/available"

    def detections_topic(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/detections"

    def status_topic(self, camera: str) -> str:
        return f"{self.prefix}/{camera}/status"

    @property
    def stats_topic(self) -> str:
        return f"{self.prefix}/stats"

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def buffered(self) -> int:
        return len(self._results)

    # ------------------------------------------------------------------ sink API

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"sink-{self.name}-connection")
        log.info(
            "sink_started",
            sink=self.name,
            kind="mqtt",
            host=self.host,
            port=self.port,
            prefix=self.prefix,
            tls=self.tls,
        )

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None:
        self._check_alive()
        self._results.append((self.detections_topic(result.camera), self._encoder.encode(result)))
        self._trim()
        self._kick()

    async def publish_status(self, camera: str, state: str, detail: str | None = None) -> None:
        """Retained ``<prefix>/<camera>/status``; only the latest state per camera is kept."""
        payload = {
            "schema": SCHEMA_VERSION,
            "camera": camera,
            "state": state,
            "detail": detail,
            "time": time.time(),
        }
        self._status[camera] = self._encoder.encode(payload)
        self._status_dirty.add(camera)
        self._kick()

    async def publish_stats(self, payload: dict[str, Any]) -> None:
        """``<prefix>/stats``, at most every ``stats_interval_s`` (0 = never).

        Stats are not buffered across an outage: only current numbers are worth sending.
        """
        if self.stats_interval_s <= 0 or self._client is None:
            return
        now = self._clock()
        # 5% slack: the reporter's ticks jitter around an interval equal to ours.
        if self._stats_last is not None and now - self._stats_last < self.stats_interval_s * 0.95:
            return
        self._stats_last = now
        self._stats = self._encoder.encode({"schema": SCHEMA_VERSION, **payload})
        self._kick()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await self._say_goodbye()
        finally:
            # Even when our caller's own deadline cancels us: never leave the task behind.
            task.cancel()
            await asyncio.wait({task})  # its clean disconnect runs as the cancellation unwinds
        if not task.cancelled() and task.exception() is not None:
            log.error("mqtt_task_failed", sink=self.name, error=repr(task.exception()))
        if self._results:
            # Not an overflow: these fit the buffer but the broker never took them.
            undelivered = len(self._results)
            self._results.clear()
            self._count_lost(undelivered)
            log.warning(
                "mqtt_undelivered_at_close", sink=self.name, results=undelivered, dropped_total=self.dropped
            )
        log.info("sink_closed", sink=self.name, kind="mqtt", dropped=self.dropped)

    async def _say_goodbye(self) -> None:
        """Deliver what is buffered, then say ``offline`` ourselves: a clean disconnect fires no will."""
        client = self._client
        if client is None:
            return
        try:
            # Bounded: a broker that stopped acknowledging must not hang shutdown.
            async with asyncio.timeout(self.close_timeout_s):
                await self._idle.wait()
                await client.publish(self.available_topic, b"offline", qos=self.qos, retain=True)
        except TimeoutError:
            # No count here: a batch still in flight is not back in the buffer yet;
            # aclose() logs what was finally left undelivered.
            log.warning("mqtt_close_timeout", sink=self.name, timeout_s=self.close_timeout_s)
        except aiomqtt.MqttError as exc:
            log.warning("mqtt_offline_publish_failed", sink=self.name, error=repr(exc))

    # ------------------------------------------------------------------ buffer

    def _check_alive(self) -> None:
        # A connection task that died of a bug would leave a sink that buffers
        # forever and looks healthy: fail every caller loudly instead.
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"MQTT sink {self.name!r} connection task failed") from task.exception()

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    def _limit(self) -> int:
        # With buffer = 0 nothing outlives an outage, but a connected sink still
        # needs room for the results that arrive between two drain passes.
        return self.buffer if self._client is None else max(self.buffer, WINDOW)

    def _trim(self) -> None:
        excess = len(self._results) - self._limit()
        if excess > 0:
            for _ in range(excess):
                self._results.popleft()
            self._drop(excess)

    def _drop(self, n: int) -> None:
        """``n`` results pushed out of a full buffer."""
        self._count_lost(n)
        if not self._overflowing:
            # Once per outage, not once per result.
            self._overflowing = True
            log.warning("mqtt_buffer_full", sink=self.name, buffer=self.buffer, dropped_total=self.dropped)

    def _count_lost(self, n: int) -> None:
        self.dropped += n
        if self._metrics is not None:
            self._metrics.sink_dropped(self.name, n)

    # ------------------------------------------------------------------ connection

    def _make_client(self) -> aiomqtt.Client:
        # Built per connection, from the files as they are now (TlsFileError if one went bad).
        tls_context = (
            client_context(self.ca_file, self.cert_file, self.key_file, insecure=self.tls_insecure)
            if self.tls
            else None
        )
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self.username,
            password=self.password,
            keepalive=self.keepalive,
            timeout=self.op_timeout_s,
            will=aiomqtt.Will(self.available_topic, b"offline", qos=self.qos, retain=True),
            tls_context=tls_context,
            logger=self._client_logger,
        )
        client.pending_calls_threshold = PENDING_CALLS_THRESHOLD
        return client

    async def _run(self) -> None:
        attempt = 0
        while True:
            connected_before = self.connects
            try:
                # A fresh client per connection: paho's session state from a broken
                # connection would otherwise resend what we already re-queued.
                self._client_log.last = None
                await self._session(self._make_client())
            except* (aiomqtt.MqttError, TlsFileError) as group:
                self.connect_failures += 1
                event = "mqtt_disconnected" if self.connects > connected_before else "mqtt_connect_failed"
                # A warning when the outage starts and every few minutes while it lasts, not at
                # every retry of a broker that stays down.
                say = log.warning if self._outage.failed() else log.debug
                say(
                    event,
                    sink=self.name,
                    host=self.host,
                    port=self.port,
                    error=str(group.exceptions[0]),
                    detail=self._client_log.take(),  # the client's own last word, if any
                    attempts=self._outage.attempts,
                    down_s=round(self._outage.down_s, 1),
                )
            finally:
                self._client = None
                self._trim()  # the outage bound applies from now on
            if self.connects > connected_before:
                attempt = 0
            delay = backoff_delay(attempt, self.reconnect_base_s, self.reconnect_cap_s, self._uniform)
            attempt += 1
            log.debug("mqtt_reconnect_wait", sink=self.name, delay_s=round(delay, 3), attempt=attempt)
            await asyncio.sleep(delay)

    async def _session(self, client: aiomqtt.Client) -> None:
        async with client:
            self.connects += 1
            self._client = client
            self._overflowing = False
            log.info(
                "mqtt_connected", sink=self.name, host=self.host, port=self.port, buffered=len(self._results)
            )
            if (outage := self._outage.recovered()) is not None:
                log.info("mqtt_recovered", sink=self.name, attempts=outage[0], down_s=round(outage[1], 1))
            await client.publish(self.available_topic, b"online", qos=self.qos, retain=True)
            # Retained state may be gone (a broker restarted without persistence): resend it.
            self._status_dirty.update(self._status)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(client), name=f"sink-{self.name}-watch")
                tg.create_task(self._drain(client), name=f"sink-{self.name}-drain")
                if self._sweep is not None and not self._sweep.done:
                    tg.create_task(self._sweep.run(client), name=f"sink-{self.name}-status-sweep")

    async def _watch(self, client: aiomqtt.Client) -> None:
        # The one reader of the client's messages. Besides the status sweep's we subscribe to
        # nothing: the iterator's other job is to raise MqttError the moment the connection
        # drops, which tears the session down without waiting for a publish to time out.
        async for message in client.messages:
            if self._sweep is not None and self._sweep.offer(message):
                continue
            log.debug("mqtt_unexpected_message", sink=self.name, topic=str(message.topic))

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            await self._send_control(client)
            if self._results:
                await self._send_results(client)
                continue
            if self._status_dirty or self._stats is not None:
                continue
            self._idle.set()
            await self._wake.wait()
            self._wake.clear()

    async def _send_control(self, client: aiomqtt.Client) -> None:
        while self._status_dirty:
            camera = self._status_dirty.pop()
            try:
                await client.publish(
                    self.status_topic(camera), self._status[camera], qos=self.qos, retain=True
                )
            except BaseException:
                self._status_dirty.add(camera)
                raise
        if self._stats is not None:
            stats, self._stats = self._stats, None
            await client.publish(self.stats_topic, stats, qos=self.qos)

    async def _send_results(self, client: aiomqtt.Client) -> None:
        batch = [self._results.popleft() for _ in range(min(WINDOW, len(self._results)))]
        # Tasks start in creation order and each hands its packet to paho at once,
        # so the broker receives the batch in order.
        tasks = [
            asyncio.create_task(
                client.publish(topic, payload, qos=self.qos), name=f"sink-{self.name}-publish"
            )
            for topic, payload in batch
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            unsent = [item for item, t in zip(batch, tasks, strict=True) if not _succeeded(t)]
            for t in tasks:
                t.cancel()
            # Back to the front, ahead of newer results; the outage bound still applies.
            self._results.extendleft(reversed(unsent))
            raise


def _succeeded(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
