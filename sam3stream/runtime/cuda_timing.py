"""Timing one GPU call with CUDA events: the median over repeats, in milliseconds."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

__all__ = ["median_cuda_ms"]


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
