"""Clearing the retained ``<prefix>/<camera>/status`` of cameras that this pipeline no longer has.

A camera removed from the config would otherwise stay "running" on the broker for good. A prefix
belongs to one pipeline (its availability topic and last will are per prefix), so any retained
status under it for a camera the sink does not serve is stale.

The broker sends retained messages right after it acknowledges a subscription: the sweep
subscribes to ``<prefix>/+/status``, collects until a short quiet period passes, unsubscribes
and publishes an empty retained payload (which deletes a retained message) for each stale
camera. The connection's single message reader hands it the messages (``offer``); the sweep
never reads the client's message iterator itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiomqtt
import structlog

__all__ = ["QUIET_S", "StatusSweep"]

log = structlog.get_logger(__name__)

# Retained messages follow the SUBACK at once: this long without another ends the collection.
QUIET_S = 0.25


class StatusSweep:
    """One sink's sweep; ``run`` it once per connection until ``done``."""

    def __init__(
        self,
        prefix: str,
        served: Iterable[str],
        *,
        sink: str,
        qos: int,
        timeout_s: float,
        quiet_s: float = QUIET_S,
    ) -> None:
        self.prefix = prefix
        self.served = frozenset(served)
        self.sink = sink
        self.qos = qos
        self.timeout_s = timeout_s  # bounds the whole collection, however busy the topic
        self.quiet_s = quiet_s
        self.done = False
        self._collecting = False
        self._found: set[str] = set()
        self._arrived = asyncio.Event()

    @property
    def topic_filter(self) -> str:
        return f"{self.prefix}/+/status"

    def offer(self, message: aiomqtt.Message) -> bool:
        """Take a message the sweep subscribed for; False when it is not one."""
        # Only retained deliveries: a live status (ours, once published) arrives with retain unset.
        if not (self._collecting and message.retain and message.topic.matches(self.topic_filter)):
            return False
        if message.payload:  # an empty retained payload is a deletion, not a status
            self._found.add(message.topic.value[len(self.prefix) + 1 : -len("/status")])
        self._arrived.set()
        return True

    async def run(self, client: aiomqtt.Client) -> None:
        self._found.clear()
        self._collecting = True
        try:
            # QoS 0: retained messages then come without the broker's in-flight window, which
            # could hold some back past the quiet period.
            await client.subscribe(self.topic_filter, qos=0)
            await self._collect()
            await client.unsubscribe(self.topic_filter)  # what arrives before its ack still counts
        finally:
            self._collecting = False
        stale = sorted(self._found - self.served)
        for camera in stale:
            await client.publish(f"{self.prefix}/{camera}/status", b"", qos=self.qos, retain=True)
        self.done = True
        if stale:
            log.info("mqtt_stale_status_cleared", sink=self.sink, prefix=self.prefix, cameras=stale)

    async def _collect(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    self._arrived.clear()
                    try:
                        async with asyncio.timeout(self.quiet_s):
                            await self._arrived.wait()
                    except TimeoutError:
                        return  # quiet: the broker has sent what it retained
        except TimeoutError:
            # Status messages kept coming: clear the stale ones seen so far.
            log.debug("mqtt_status_sweep_cut_short", sink=self.sink, timeout_s=self.timeout_s)
