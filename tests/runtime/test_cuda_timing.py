"""median_cuda_ms: warm-up calls untimed, the median of the timed ones (CUDA events stood in for)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sam3stream.runtime import cuda_timing


class _Event:
    """Records a tick from a shared clock; elapsed_time is the tick difference."""

    clock = itertools.count()

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.tick = -1

    def record(self) -> None:
        self.tick = next(self.clock)

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _Event) -> float:
        return float(end.tick - self.tick)


def test_median_of_timed_calls_after_untimed_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    calls = []
    # Each call advances the clock by its own cost: 1, 5, 2, 9, 3 ticks after one warm-up call.
    costs = iter([100, 1, 5, 2, 9, 3])

    def fn() -> None:
        cost = next(costs)
        calls.append(cost)
        for _ in range(cost):
            next(_Event.clock)

    ms = cuda_timing.median_cuda_ms(fn, repeats=5, warmup=1)
    assert calls == [100, 1, 5, 2, 9, 3]
    # elapsed = cost + 1 (the end event's own tick); median of 2, 6, 3, 10, 4
    assert ms == 4.0
