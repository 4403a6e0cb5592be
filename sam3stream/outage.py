"""How loudly a retry loop reports its failures: a warning when an outage starts, then a reminder
every ``remind_s`` while it lasts, and the attempts in between at debug level.

A dead camera or broker retried every few seconds would otherwise fill a day's logs with the
same warning; an operator needs to know when it went down, that it is still down, and when it
came back (with how long it was down and how many attempts it took).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["REMIND_S", "Outage"]

REMIND_S = 300.0  # a still-failing retry loop warns again this often


class Outage:
    """One retry loop's outage: ``failed()`` after each failed attempt, ``recovered()`` after a
    success. Not thread-safe: each loop owns its own."""

    def __init__(self, remind_s: float = REMIND_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.remind_s = remind_s
        self._clock = clock
        self.attempts = 0  # failed attempts in the current outage (0: none going on)
        self._started = 0.0
        self._warned = 0.0

    @property
    def down_s(self) -> float:
        """Seconds since the outage's first failure (0 when there is none)."""
        return self._clock() - self._started if self.attempts else 0.0

    def failed(self) -> bool:
        """Count a failed attempt; True when it should be logged as a warning: the outage's first
        failure, or the first one ``remind_s`` after the last warning."""
        now = self._clock()
        self.attempts += 1
        if self.attempts == 1:
            self._started = self._warned = now
            return True
        if now - self._warned >= self.remind_s:
            self._warned = now
            return True
        return False

    def recovered(self) -> tuple[int, float] | None:
        """End the outage: its failed attempts and length in seconds, or None when there was none."""
        if not self.attempts:
            return None
        ended = (self.attempts, self.down_s)
        self.attempts = 0
        return ended
