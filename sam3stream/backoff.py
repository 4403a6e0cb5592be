"""Reconnect delays shared by camera sources and the MQTT sink."""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["backoff_delay"]


def backoff_delay(
    attempt: int, base: float, cap: float, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """Full-jitter exponential backoff: ``uniform(0, min(cap, base * 2**attempt))``.

    The exponent is bounded so that a long outage cannot overflow the float.
    """
    return uniform(0.0, min(cap, base * 2.0 ** min(attempt, 62)))
