"""close_executor: the close completes, and says how it went, even when its caller is cancelled."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import structlog

from sam3stream.stream import threads
from sam3stream.stream.threads import close_executor, single_thread


def _failing_close() -> None:
    raise OSError("device gone")


async def test_a_cancelled_caller_returns_at_once_and_the_close_still_completes() -> None:
    pool = single_thread("closing-test")
    pool.submit(time.sleep, 0.3)  # a decode call in progress
    thread = next(t for t in threading.enumerate() if t.name.startswith("closing-test"))
    with structlog.testing.capture_logs() as logs:
        caller = asyncio.create_task(close_executor(pool, 5.0, _failing_close))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert thread.is_alive()  # still in its call: the caller did not wait for it
        going_on = set(threads._closing)
        assert going_on  # the close goes on as a task of its own
        await asyncio.wait(going_on, timeout=5)
        assert not thread.is_alive()
    # ``last`` ran after the call in progress, and its failure was reported by the close that
    # went on without its caller.
    assert [e["error"] for e in logs if e["event"] == "thread_close_failed"] == ["OSError('device gone')"]


async def test_a_call_that_outlasts_the_timeout_is_reported_busy() -> None:
    pool = single_thread("busy-test")
    release = threading.Event()
    pool.submit(release.wait, 5)
    with structlog.testing.capture_logs() as logs:
        await close_executor(pool, 0.05)
    release.set()
    assert [e["event"] for e in logs] == ["thread_still_busy"]
