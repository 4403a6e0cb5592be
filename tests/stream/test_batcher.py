"""Batcher: batch size and wait bounds, and fairness across cameras."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import numpy as np
import pytest

from sam3stream.stream.batch_queue import BatchQueue
from sam3stream.stream.batcher import Batch, Batcher
from sam3stream.stream.frames import Frame
from sam3stream.stream.mailbox import Doorbell, Inbox, InFlight


def frame(camera: str, seq: int) -> Frame:
    return Frame(
        camera=camera,
        seq=seq,
        pts=seq,
        stream_time=None,
        capture_time=time.time(),
        width=4,
        height=4,
        pixels=np.zeros((2, 2, 3), np.uint8),
    )


def inboxes(names: list[str], capacity: int, doorbell: Doorbell) -> dict[str, Inbox]:
    in_flight = InFlight()
    return {
        n: Inbox(
            n,
            capacity=capacity,
            policy="block",
            doorbell=doorbell,
            in_flight=in_flight,
            on_drop=lambda c, k: None,
        )
        for n in names
    }


async def test_flushes_full_batches_and_partial_ones_after_max_wait() -> None:
    bell = Doorbell()
    boxes = inboxes(["a"], 16, bell)
    out: BatchQueue[Batch] = BatchQueue(2)
    batcher = Batcher(list(boxes.values()), out, doorbell=bell, max_batch=4, max_wait_s=0.05)
    task = asyncio.create_task(batcher.run())
    try:
        for i in range(6):
            await boxes["a"].put(frame("a", i))
        first = await asyncio.wait_for(out.get(), 2)
        assert [f.seq for f in first.frames] == [0, 1, 2, 3]
        started = time.monotonic()
        second = await asyncio.wait_for(out.get(), 2)
        assert [f.seq for f in second.frames] == [4, 5]
        assert time.monotonic() - started < 1.0  # flushed by max_wait, not stuck waiting to fill
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_fast_camera_cannot_starve_a_slow_one() -> None:
    bell = Doorbell()
    boxes = inboxes(["fast", "slow"], 64, bell)
    out: BatchQueue[Batch] = BatchQueue(2)
    batcher = Batcher(list(boxes.values()), out, doorbell=bell, max_batch=4, max_wait_s=0.01)

    async def fast() -> None:
        for i in range(1000):
            await boxes["fast"].put(frame("fast", i))  # as fast as the batcher takes them

    async def slow() -> None:
        for i in range(1000):
            await boxes["slow"].put(frame("slow", i))
            await asyncio.sleep(0.005)

    async def consume(n: int) -> list[Batch]:
        got = []
        for _ in range(n):
            got.append(await out.get())
            await asyncio.sleep(0.005)  # the "GPU" takes a while per batch
        return got

    tasks = [asyncio.create_task(c) for c in (batcher.run(), fast(), slow())]
    try:
        batches = await asyncio.wait_for(consume(60), 20)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    per_batch = [Counter(f.camera for f in b.frames) for b in batches]
    # Once the slow camera has a frame waiting, it is in the next batch: its queue never builds up,
    # while the fast camera's stays full.
    assert boxes["slow"].high_water <= 2
    assert boxes["fast"].high_water == 64
    slow_total = sum(c["slow"] for c in per_batch)
    assert slow_total >= 30  # about one per 5-10 ms batch, not starved behind hundreds of fast frames
    assert all(c["fast"] <= 4 for c in per_batch)
    # In order per camera.
    for cam in ("fast", "slow"):
        seqs = [f.seq for b in batches for f in b.frames if f.camera == cam]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_round_robin_takes_one_frame_per_camera_per_round() -> None:
    bell = Doorbell()
    boxes = inboxes(["a", "b", "c"], 8, bell)
    for i in range(4):
        await boxes["a"].put(frame("a", i))
    await boxes["b"].put(frame("b", 0))
    await boxes["c"].put(frame("c", 0))
    out: BatchQueue[Batch] = BatchQueue(2)
    batcher = Batcher(list(boxes.values()), out, doorbell=bell, max_batch=4, max_wait_s=0.0)
    task = asyncio.create_task(batcher.run())
    try:
        batch = await asyncio.wait_for(out.get(), 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [(f.camera, f.seq) for f in batch.frames] == [("a", 0), ("b", 0), ("c", 0), ("a", 1)]


async def test_a_live_camera_newer_frame_replaces_one_waiting_while_the_worker_is_busy() -> None:
    # The worker's queue is full: the batcher must leave the camera's frames in its inbox, where a
    # newer frame replaces an older one, rather than hold them in a batch that waits for room.
    bell = Doorbell()
    dropped: list[int] = []
    live = Inbox(
        "cam",
        capacity=1,
        policy="drop_oldest",
        doorbell=bell,
        in_flight=InFlight(),
        on_drop=lambda camera, n: dropped.append(n),
    )
    out: BatchQueue[Batch] = BatchQueue(1)
    batcher = Batcher([live], out, doorbell=bell, max_batch=4, max_wait_s=0.0)
    task = asyncio.create_task(batcher.run())
    try:
        await live.put(frame("cam", 0))
        await asyncio.sleep(0.05)
        assert out.qsize() == 1  # frame 0's batch fills the only place
        await live.put(frame("cam", 1))
        await asyncio.sleep(0.05)  # the batcher has had every chance to take frame 1
        assert len(live) == 1, "the batcher took a frame with no place to put its batch"
        await live.put(frame("cam", 2))  # replaces frame 1
        first = await asyncio.wait_for(out.get(), 2)
        second = await asyncio.wait_for(out.get(), 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [f.seq for f in first.frames] == [0]
    assert [f.seq for f in second.frames] == [2]
    assert dropped == [1]


async def test_batch_queue_holds_places_for_reserved_batches_only() -> None:
    queue: BatchQueue[str] = BatchQueue(2)
    await queue.reserve()
    await queue.reserve()
    third = asyncio.create_task(queue.reserve())
    await asyncio.sleep(0.01)
    assert not third.done()  # both places are taken, although neither is filled yet
    queue.put("a")
    queue.unreserve()  # the second place given back unfilled
    await asyncio.wait_for(third, 1)
    queue.put("b")
    assert queue.qsize() == 2
    fourth = asyncio.create_task(queue.reserve())
    await asyncio.sleep(0.01)
    assert not fourth.done()
    assert queue.get_nowait() == "a"  # taking a batch frees its place
    await asyncio.wait_for(fourth, 1)
    assert await queue.get() == "b"
    queue.put("c")
    with pytest.raises(RuntimeError, match="without a reserved place"):
        queue.put("d")
