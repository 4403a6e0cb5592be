"""Helpers for supervising tasks."""

from __future__ import annotations

import asyncio

__all__ = ["first_error"]


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (nested) group that is not a cancellation, else the group.

    A TaskGroup wraps the error that stopped it in a group; callers want to
    match on the error itself (EngineDeadError), so supervisors re-raise this.
    """
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = first_error(exc)
            if inner is not exc:
                return inner
        elif not isinstance(exc, asyncio.CancelledError):
            return exc
    return group
