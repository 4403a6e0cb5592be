"""Small channels between actors: per-camera inboxes, a doorbell, an in-flight count.

All of them live on the event loop; decode threads never touch them directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sam3stream.config import OnFull
from sam3stream.stream.frames import Frame

__all__ = ["Doorbell", "InFlight", "Inbox"]


class Doorbell:
    """Tells the batcher that some inbox has a frame, so it can wait on many inboxes at once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ring(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self) -> None:
        await self._event.wait()


class InFlight:
    """Frames accepted but not yet turned into results (or dropped): drain waits for zero."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    def add(self, n: int = 1) -> None:
        self._count += n
        self._idle.clear()

    def done(self, n: int = 1) -> None:
        self._count -= n
        if self._count < 0:
            raise RuntimeError("more frames finished than were started")
        if self._count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Inbox:
    """One camera's frames waiting for the batcher.

    ``drop_oldest`` (live cameras, capacity 1: latest wins) never waits and
    reports each frame it throws away; ``block`` (files) makes the source wait
    for room, so nothing is lost.
    """

    def __init__(
        self,
        camera: str,
        *,
        capacity: int,
        policy: OnFull,
        doorbell: Doorbell,
        in_flight: InFlight,
        on_drop: Callable[[str, int], None],
    ) -> None:
        self.camera = camera
        self.capacity = capacity
        self.policy = policy
        self._queue: asyncio.Queue[Frame] = asyncio.Queue(maxsize=capacity)
        self._doorbell = doorbell
        self._in_flight = in_flight
        self._on_drop = on_drop
        self.high_water = 0  # the most frames it ever held (tests check the bound)
        self.dropped = 0

    def __len__(self) -> int:
        return self._queue.qsize()

    def full(self) -> bool:
        return self._queue.full()

    async def put(self, frame: Frame) -> None:
        if self.policy == "drop_oldest":
            while self._queue.full():
                self._queue.get_nowait()
                self.dropped += 1
                self._in_flight.done()
                self._on_drop(self.camera, 1)
            self._queue.put_nowait(frame)
        else:
            await self._queue.put(frame)
        # Stamped after the put: Queue.put returns without yielding to the loop once the
        # frame is in, so nobody can take it before this line, and waiting for room does
        # not count as queue time.
        frame.enqueued = time.monotonic()
        self._in_flight.add()
        self.high_water = max(self.high_water, self._queue.qsize())
        self._doorbell.ring()

    def take(self) -> Frame:
        """The oldest frame; raises asyncio.QueueEmpty when there is none."""
        return self._queue.get_nowait()
