"""One-thread executors that actors own, and closing them without blocking the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog

__all__ = ["close_executor", "in_background", "single_thread"]

log = structlog.get_logger(__name__)

_closing: set[asyncio.Future[None]] = set()  # closes going on after their caller was cancelled


def single_thread(name: str) -> ThreadPoolExecutor:
    """An executor with exactly one thread: calls run in order, on the same thread."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


async def close_executor(
    pool: ThreadPoolExecutor, timeout_s: float, last: Callable[[], None] | None = None
) -> None:
    """Run ``last`` on the pool after whatever call is in progress, then let its thread end.

    Waits at most ``timeout_s`` (a call stuck in a read cannot be interrupted from here). The
    close is a task of its own: a caller cancelled while waiting returns at once, and the close
    still completes (``last`` runs, the thread is joined or reported still busy).
    """
    done = pool.submit(last if last is not None else _nothing)
    pool.shutdown(wait=False, cancel_futures=False)
    await in_background(_join_when_done(pool, done, timeout_s))


async def in_background(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` as a task that a cancel of the caller does not stop."""
    task = asyncio.ensure_future(work)
    _closing.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_closing.discard)
    await asyncio.shield(task)


async def _join_when_done(pool: ThreadPoolExecutor, done: Future[None], timeout_s: float) -> None:
    finished, _ = await asyncio.wait({asyncio.wrap_future(done)}, timeout=timeout_s)
    if not finished:
        log.warning("thread_still_busy", timeout_s=timeout_s)
        return
    # The thread is idle now and only has to see the shutdown: joining it takes microseconds,
    # and afterwards no thread of ours outlives its actor.
    pool.shutdown(wait=True)
    exc = done.exception()
    if exc is not None:
        log.warning("thread_close_failed", error=repr(exc))


def _nothing() -> None:
    return None
