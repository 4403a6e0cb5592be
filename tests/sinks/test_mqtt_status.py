"""Against a real Mosquitto: the retained status of cameras a pipeline no longer has is cleared,
and a broker that stays down is reported once per outage, not at every retry."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt
import msgspec
import pytest
import structlog

from sam3stream.outage import Outage
from sam3stream.sinks.mqtt import MqttSink
from tests.mosquitto import Mosquitto
from tests.sinks.test_mqtt import max_jitter, prefix, retained, wait_until

pytestmark = pytest.mark.mqtt


async def seed_status(broker: Mosquitto, p: str, cameras: list[str]) -> None:
    """Retained statuses as an earlier run of the pipeline left them."""
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for camera in cameras:
            payload = msgspec.json.encode({"camera": camera, "state": "running"})
            await client.publish(f"{p}/{camera}/status", payload, qos=1, retain=True)


async def sweep_done(sink: MqttSink) -> None:
    await wait_until(lambda: sink._sweep is not None and sink._sweep.done)


async def test_removed_cameras_lose_their_retained_status(mosquitto: Mosquitto) -> None:
    p = prefix()
    await seed_status(mosquitto, p, ["front", "old-dock", "old-gate"])
    sink = MqttSink(mosquitto.host, mosquitto.port, prefix=p, qos=1, cameras=["front", "yard"])
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        try:
            await sweep_done(sink)
            await sink.publish_status("yard", "running")
        finally:
            await sink.aclose()
    assert await retained(mosquitto, f"{p}/old-dock/status") is None
    assert await retained(mosquitto, f"{p}/old-gate/status") is None
    # Served cameras keep theirs: the earlier run's until this run says otherwise, and its own.
    front = await retained(mosquitto, f"{p}/front/status")
    assert front is not None and msgspec.json.decode(front)["state"] == "running"
    yard = await retained(mosquitto, f"{p}/yard/status")
    assert yard is not None and msgspec.json.decode(yard)["camera"] == "yard"
    cleared = [e for e in logs if e["event"] == "mqtt_stale_status_cleared"]
    assert [e["cameras"] for e in cleared] == [["old-dock", "old-gate"]]


async def test_other_prefixes_are_left_alone(mosquitto: Mosquitto) -> None:
    p, other = prefix(), prefix()
    await seed_status(mosquitto, other, ["old-dock"])
    await seed_status(mosquitto, f"{p}/nested", ["x"])  # a deeper topic is not a camera's status
    sink = MqttSink(mosquitto.host, mosquitto.port, prefix=p, cameras=["front"])
    await sink.start()
    try:
        await sweep_done(sink)
    finally:
        await sink.aclose()
    assert await retained(mosquitto, f"{other}/old-dock/status") is not None
    assert await retained(mosquitto, f"{p}/nested/x/status") is not None


@pytest.mark.parametrize("how", ["switched off", "no camera list"])
async def test_no_sweep_when_switched_off_or_without_the_cameras_served(
    mosquitto: Mosquitto, how: str
) -> None:
    p = prefix()
    await seed_status(mosquitto, p, ["old-dock"])
    kwargs: dict[str, Any] = (
        {"cameras": ["front"], "clear_stale_status": False} if how == "switched off" else {}
    )
    sink = MqttSink(mosquitto.host, mosquitto.port, prefix=p, **kwargs)
    assert sink._sweep is None
    await sink.start()
    try:
        await wait_until(lambda: sink.connected)
        await sink.publish_status("front", "running")
        await wait_until(lambda: not sink._status_dirty)
    finally:
        await sink.aclose()
    assert await retained(mosquitto, f"{p}/old-dock/status") is not None


async def test_the_sweep_runs_again_after_a_connection_lost_before_it_finished(
    mosquitto: Mosquitto,
) -> None:
    p = prefix()
    # Exactly 1 s before each reconnect: time to bring the broker back and seed it first.
    sink = MqttSink(
        mosquitto.host,
        mosquitto.port,
        prefix=p,
        cameras=["front"],
        reconnect_base_s=1.0,
        reconnect_cap_s=1.0,
        uniform=max_jitter,
    )
    assert sink._sweep is not None
    sink._sweep.quiet_s = 60.0  # the first connection's sweep cannot finish before the broker stops
    await sink.start()
    try:
        await wait_until(lambda: sink.connected)
        mosquitto.stop()
        await wait_until(lambda: not sink.connected)
        sink._sweep.quiet_s = 0.25
        mosquitto.start()  # no persistence: it comes back empty, then holds what the seed leaves
        await seed_status(mosquitto, p, ["old-dock"])
        assert not sink._sweep.done
        await wait_until(lambda: sink.connects >= 2, within=10)
        await sweep_done(sink)
    finally:
        await sink.aclose()
    assert await retained(mosquitto, f"{p}/old-dock/status") is None


def warnings(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event and e["log_level"] == "warning"]


async def test_a_broker_down_for_many_retries_is_one_warning_then_one_recovery(mosquitto: Mosquitto) -> None:
    mosquitto.stop()
    p = prefix()
    sink = MqttSink(mosquitto.host, mosquitto.port, prefix=p, reconnect_base_s=0.01, reconnect_cap_s=0.02)
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        try:
            await wait_until(lambda: sink.connect_failures >= 5)
            mosquitto.start()
            await wait_until(lambda: sink.connected, within=10)
        finally:
            await sink.aclose()
    failed = [e for e in logs if e["event"] == "mqtt_connect_failed"]
    assert len(failed) >= 5 and len(warnings(logs, "mqtt_connect_failed")) == 1
    assert [e["attempts"] for e in failed] == list(range(1, len(failed) + 1))
    [recovered] = [e for e in logs if e["event"] == "mqtt_recovered"]
    assert recovered["attempts"] == len(failed) and recovered["down_s"] >= 0


async def test_a_lost_connection_warns_and_an_outage_reminds_after_its_interval(mosquitto: Mosquitto) -> None:
    p = prefix()
    sink = MqttSink(mosquitto.host, mosquitto.port, prefix=p, reconnect_base_s=0.01, reconnect_cap_s=0.02)
    sink._outage = Outage(remind_s=0.3)  # the 5-minute reminder, shortened
    with structlog.testing.capture_logs() as logs:
        await sink.start()
        try:
            await wait_until(lambda: sink.connected)
            mosquitto.stop()
            await wait_until(lambda: len(warnings(logs, "mqtt_connect_failed")) >= 1, within=10)
            await asyncio.sleep(0.5)
        finally:
            await sink.aclose()
    # The loss itself, then reminders while it lasts: far fewer warnings than attempts.
    assert len(warnings(logs, "mqtt_disconnected")) == 1
    attempts = sum(1 for e in logs if e["event"] == "mqtt_connect_failed")
    reminders = len(warnings(logs, "mqtt_connect_failed"))
    assert 1 <= reminders <= 3 and attempts > 3 * reminders
