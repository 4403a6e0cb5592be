"""Timing GPU calls with CUDA events: the median over repeats, in milliseconds."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

__all__ = ["best_alternating_ms", "median_cuda_ms"]


def median_cuda_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        # torch.cuda.Event is unannotated in torch.
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def best_alternating_ms(forms: Sequence[Callable[[], object]], rounds: int, repeats: int) -> list[float]:
    """Each form's best median over ``rounds`` rounds that time all the forms in turn, so that
    clocks still ramping up at start favour none of them (how the backend picks between two
    forms of one step)."""
    best = [float("inf")] * len(forms)
    for _ in range(rounds):
        for index, form in enumerate(forms):
            best[index] = min(best[index], median_cuda_ms(form, repeats))
    return best
