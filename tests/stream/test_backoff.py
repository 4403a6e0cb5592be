"""Reconnect backoff: full jitter under a doubling, capped ceiling."""

from __future__ import annotations

import random

from sam3stream.stream.source import Backoff


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=8.0, rng=random.Random(1))
    for attempt, ceiling in enumerate([0.5, 1, 2, 4, 8, 8, 8]):
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spans the whole range
    assert backoff.delay(10_000) <= 8.0  # no overflow for a camera that has been down for days
