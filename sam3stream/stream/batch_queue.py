"""The channel from the batcher to the GPU worker: formed batches waiting for the worker.

The batcher reserves a place before it takes any frame out of the cameras' inboxes. A batch
formed while the channel is full would hold its frames out of the inboxes, where a live
camera's newer frame could no longer replace them: results would come back one batch staler.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

__all__ = ["BatchQueue"]

T = TypeVar("T")


class BatchQueue(Generic[T]):
    """At most ``size`` batches waiting; ``reserve`` waits for a place, ``put`` fills it."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self._batches: asyncio.Queue[T] = asyncio.Queue()
        self._room = asyncio.Semaphore(size)
        self._reserved = 0

    async def reserve(self) -> None:
        await self._room.acquire()
        self._reserved += 1

    def unreserve(self) -> None:
        """Give back a place reserved but not filled (the batcher stopped while forming)."""
        self._take_reservation()
        self._room.release()

    def put(self, batch: T) -> None:
        self._take_reservation()
        self._batches.put_nowait(batch)

    async def get(self) -> T:
        batch = await self._batches.get()
        self._room.release()
        return batch

    def get_nowait(self) -> T:
        batch = self._batches.get_nowait()
        self._room.release()
        return batch

    def empty(self) -> bool:
        return self._batches.empty()

    def qsize(self) -> int:
        return self._batches.qsize()

    def _take_reservation(self) -> None:
        if self._reserved == 0:
            raise RuntimeError("put or unreserve without a reserved place")
        self._reserved -= 1
