"""Batcher: frames from many cameras into batches for the GPU worker, fairly.

A batch closes when it holds ``max_batch`` frames or ``max_wait_s`` after its
first frame, whichever comes first. It takes frames only once the GPU worker's queue has a
place for the batch, so that frames wait in the cameras' inboxes, where a live camera's newer
frame replaces an older one, rather than in a formed batch. Frames are taken round-robin, one per
camera per round, starting each round after the camera served last: a camera
that produces faster than the others gets the leftover slots, never theirs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import msgspec

from sam3stream.stream.batch_queue import BatchQueue
from sam3stream.stream.frames import Frame
from sam3stream.stream.mailbox import Doorbell, Inbox

__all__ = ["Batch", "Batcher"]


class Batch(msgspec.Struct, gc=False):
    frames: list[Frame]
    formed: float  # monotonic time the batch closed


class Batcher:
    def __init__(
        self,
        inboxes: Sequence[Inbox],
        out: BatchQueue[Batch],
        *,
        doorbell: Doorbell,
        max_batch: int,
        max_wait_s: float,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._inboxes = list(inboxes)
        self._out = out
        self._doorbell = doorbell
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._next = 0  # index of the inbox that goes first in the next round

    async def run(self) -> None:
        while True:
            await self._out.reserve()
            try:
                frames = await self._collect()
            except BaseException:
                self._out.unreserve()
                raise
            self._out.put(Batch(frames=frames, formed=time.monotonic()))

    async def _collect(self) -> list[Frame]:
        frames: list[Frame] = []
        self._take_into(frames)
        while not frames:
            await self._wait_for_frames()
            self._take_into(frames)
        deadline = asyncio.get_running_loop().time() + self._max_wait_s
        while len(frames) < self._max_batch:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wait_for_frames()
            except TimeoutError:
                break
            self._take_into(frames)
        return frames

    async def _wait_for_frames(self) -> None:
        # Clear first, then look: a frame that arrived before the clear is seen by the look.
        self._doorbell.clear()
        if any(len(inbox) for inbox in self._inboxes):
            return
        await self._doorbell.wait()

    def _take_into(self, frames: list[Frame]) -> None:
        """Fill ``frames`` up to max_batch, one frame per camera per round."""
        n = len(self._inboxes)
        while len(frames) < self._max_batch:
            took = False
            start = self._next
            for i in range(n):
                if len(frames) >= self._max_batch:
                    return
                idx = (start + i) % n
                inbox = self._inboxes[idx]
                if len(inbox):
                    frames.append(inbox.take())
                    took = True
                    # The camera after this one starts the next round, so when a batch
                    # fills mid-round the cameras not yet served go first next time.
                    self._next = (idx + 1) % n
            if not took:
                return
