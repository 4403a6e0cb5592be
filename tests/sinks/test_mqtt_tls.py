"""MqttSink over TLS against a real Mosquitto TLS listener, with a throw-away CA (trustme)."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
import structlog
import trustme

from sam3stream.sinks.mqtt import MqttSink
from sam3stream.stream.frames import FrameResult
from tests.mosquitto import Mosquitto, find_mosquitto
from tests.sinks.results import make_result
from tests.sinks.test_mqtt import Subscriber, prefix, wait_until

pytestmark = pytest.mark.mqtt


def tls_sink(broker: Mosquitto, **options: Any) -> MqttSink:
    # Fast retries: a refused handshake is retried several times within a fraction of a second.
    return MqttSink(
        broker.host, broker.port, tls=True, reconnect_base_s=0.01, reconnect_cap_s=0.05, **options
    )


def pem(path: Path, blob: trustme.Blob) -> str:
    blob.write_to_path(path)
    return str(path)


class Pki:
    """The broker's CA and a client certificate it issued, as files; and a CA nobody trusts."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.ca = trustme.CA()
        self.ca_file = pem(folder / "ca.pem", self.ca.cert_pem)
        self.other_ca_file = pem(folder / "other-ca.pem", trustme.CA().cert_pem)
        client = self.ca.issue_cert("client@example.org")
        self.client = client
        self.cert_file = pem(folder / "client.pem", client.cert_chain_pems[0])
        self.key_file = pem(folder / "client.key", client.private_key_pem)

    def context(self, *, client_cert: bool = False, check_hostname: bool = True) -> ssl.SSLContext:
        """The test subscriber's own context (not sam3stream's, which is under test)."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if client_cert:
            self.client.configure_cert(context)
        context.check_hostname = check_hostname
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Mosquitto]]:
    """``tls_broker(*names, require_certificate=False)``: a started Mosquitto whose TLS listener
    presents a certificate from ``pki.ca`` for ``names`` (default: 127.0.0.1 and localhost)."""
    binary = find_mosquitto()
    if binary is None:
        if os.environ.get("MQTT_REQUIRED"):
            pytest.fail("MQTT_REQUIRED is set but no mosquitto binary was found")
        pytest.skip("mosquitto is not installed")
    brokers: list[Mosquitto] = []

    def start(*names: str, require_certificate: bool = False) -> Mosquitto:
        workdir = tmp_path / f"broker-{len(brokers)}"
        workdir.mkdir()
        server = pki.ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
        listener = (
            f"cafile {pki.ca_file}\n"
            f"certfile {pem(workdir / 'server.pem', server.cert_chain_pems[0])}\n"
            f"keyfile {pem(workdir / 'server.key', server.private_key_pem)}\n"
            f"require_certificate {str(require_certificate).lower()}\n"
            # The certificate proves who connects; the MQTT username stays anonymous.
            "use_identity_as_username false\n"
        )
        broker = Mosquitto(binary, workdir, listener=listener)
        brokers.append(broker)
        broker.start()  # returns once the TLS port accepts TCP connections
        return broker

    try:
        yield start
    finally:
        for broker in brokers:
            broker.stop()


@asynccontextmanager
async def subscribed(broker: Mosquitto, topic: str, context: ssl.SSLContext) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client(broker.host, broker.port, tls_context=context) as client:
        await client.subscribe(topic, qos=1)
        sub = Subscriber(client)
        async with _running(sub):
            yield sub


@asynccontextmanager
async def _running(sub: Subscriber) -> AsyncIterator[None]:
    task = asyncio.create_task(sub.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task})


async def comes_online(sink: MqttSink, broker: Mosquitto, context: ssl.SSLContext) -> None:
    """Start ``sink``, see its ``online`` arrive at a subscriber using ``context``, close it."""
    topic = f"{sink.prefix}/available"
    async with subscribed(broker, topic, context) as sub:
        await sink.start()
        try:
            await sub.wait_for(lambda: sub.on(topic) == [b"online"])
        finally:
            await sink.aclose()


async def refused(sink: MqttSink, attempts: int = 4) -> list[MutableMapping[str, Any]]:
    """Run ``sink`` through ``attempts`` failed connections; the connect failures it logged."""
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        try:
            await wait_until(lambda: sink.connect_failures >= attempts)
        finally:
            await sink.aclose()
    assert sink.connects == 0
    return [e for e in logs if e["event"] == "mqtt_connect_failed"]


async def test_detections_and_availability_over_tls(tls_broker: Callable[..., Mosquitto], pki: Pki) -> None:
    broker = tls_broker()
    p = prefix()
    sink = tls_sink(broker, prefix=p, qos=1, ca_file=pki.ca_file)
    async with subscribed(broker, f"{p}/#", pki.context()) as sub:
        await sink.start()
        await sub.wait_for(lambda: sub.on(f"{p}/available") == [b"online"])
        sent = [make_result(i, camera="front") for i in range(20)]
        for r in sent:
            await sink.publish(r)
        topic = f"{p}/front/detections"
        await sub.wait_for(lambda: len(sub.on(topic)) >= len(sent))
        assert [msgspec.json.decode(x, type=FrameResult) for x in sub.on(topic)] == sent
        await sink.aclose()
        await sub.wait_for(lambda: sub.on(f"{p}/available") == [b"online", b"offline"])
    assert sink.connects == 1 and sink.connect_failures == 0 and sink.dropped == 0


async def test_a_broker_signed_by_another_ca_is_refused_with_one_warning(
    tls_broker: Callable[..., Mosquitto], pki: Pki
) -> None:
    broker = tls_broker()
    sink = tls_sink(broker, ca_file=pki.other_ca_file)
    failures = await refused(sink)
    # One warning for the outage, the retries after it at debug: not a warning per attempt.
    warnings = [e for e in failures if e["log_level"] == "warning"]
    assert len(warnings) == 1 and len(failures) >= 4
    assert "certificate verify failed" in warnings[0]["error"]


async def test_a_broker_that_requires_a_client_certificate(
    tls_broker: Callable[..., Mosquitto], pki: Pki
) -> None:
    broker = tls_broker(require_certificate=True)
    p = prefix()
    with_cert = tls_sink(
        broker, prefix=p, ca_file=pki.ca_file, cert_file=pki.cert_file, key_file=pki.key_file
    )
    await comes_online(with_cert, broker, pki.context(client_cert=True))
    assert with_cert.connects == 1

    # With TLS 1.3 the broker refuses a missing certificate after the handshake; aiomqtt ignores a
    # disconnect before CONNACK, so each attempt ends at op_timeout_s ("Operation timed out"),
    # and only the client's own log says why: the failure event carries it.
    without = tls_sink(broker, prefix=prefix(), ca_file=pki.ca_file, op_timeout_s=0.2)
    failures = await refused(without, attempts=2)
    assert [e["log_level"] for e in failures] == ["warning", "debug"]
    assert all("certificate required" in (e["detail"] or "") for e in failures)


async def test_tls_insecure_accepts_a_certificate_for_another_name(
    tls_broker: Callable[..., Mosquitto], pki: Pki
) -> None:
    broker = tls_broker("broker.example")  # we connect to 127.0.0.1, which it does not name
    strict = tls_sink(broker, ca_file=pki.ca_file)
    failures = await refused(strict)
    # Refused for the name alone: the chain is good.
    assert "IP address mismatch" in failures[0]["error"]

    p = prefix()
    insecure = tls_sink(broker, prefix=p, ca_file=pki.ca_file, tls_insecure=True)
    await comes_online(insecure, broker, pki.context(check_hostname=False))
    assert insecure.connects == 1 and insecure.connect_failures == 0


async def test_tls_insecure_still_verifies_the_certificate(
    tls_broker: Callable[..., Mosquitto], pki: Pki
) -> None:
    # Skipping the name check must not mean trusting any certificate.
    broker = tls_broker("broker.example")
    sink = tls_sink(broker, ca_file=pki.other_ca_file, tls_insecure=True)
    failures = await refused(sink)
    assert "certificate verify failed" in failures[0]["error"]
