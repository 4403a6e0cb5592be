"""Timing GPU calls with CUDA events: the median over repeats, in milliseconds."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["best_alternating_ms", "cuda_graphed", "median_cuda_ms", "require_cuda", "write_report"]


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


def cuda_graphed(fn: Callable[[], object], stream: torch.cuda.Stream | None = None) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph, after two calls on a side stream that compile or tune
    whatever needs it; the result replays the graph. Timing replays measures the GPU's work
    alone, as the backend runs it (captured): timing ``fn`` itself also counts the host's
    dispatch before its first kernel, tens of microseconds for a custom op, enough to reverse
    a choice between two forms a few percent apart.

    ``stream``: the side stream (default: a new one). The backend passes one it holds, because
    cuBLAS keeps a workspace for every stream it ran on for the life of the process."""
    side = stream if stream is not None else torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # not torch's own capture stream: another workspace
        fn()
    return graph.replay


def best_alternating_ms(forms: Sequence[Callable[[], object]], rounds: int, repeats: int) -> list[float]:
    """Each form's best median over ``rounds`` rounds that time all the forms in turn, so that
    clocks still ramping up at start favour none of them (how the backend picks between two
    forms of one step)."""
    best = [float("inf")] * len(forms)
    for _ in range(rounds):
        for index, form in enumerate(forms):
            best[index] = min(best[index], median_cuda_ms(form, repeats))
    return best


def require_cuda(tool: str, instead: str = "") -> None:
    """Exit with a message that says why, before a GPU timing or profiling tool (``tool``: its
    path) starts on a machine where torch sees no CUDA device; ``instead``: what else the
    tool can do, if anything."""
    if not torch.cuda.is_available():
        raise SystemExit(
            f"{tool} measures CUDA kernels and needs an NVIDIA GPU, but torch {torch.__version__} sees "
            f"no CUDA device here; run it on the GPU machine{f', or {instead}' if instead else ''}"
        )


def write_report(out: Path, tool: str, rows: list[dict[str, Any]], device: str | None = None) -> Path:
    """A timing tool's JSON report at ``out`` (suffix .json): the command that made it (``tool``
    and this process's arguments), the GPU, the torch build and the rows. Returns its path."""
    report = {
        "command": " ".join(["python", tool, *sys.argv[1:]]),
        "device": device or torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
    }
    path = out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
