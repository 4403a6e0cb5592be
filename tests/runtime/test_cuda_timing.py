"""median_cuda_ms: warm-up calls untimed, the median of the timed ones; best_alternating_ms: forms
timed in turn, each keeping its best round (CUDA events stood in for); the timing tools' report."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

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


def test_alternating_rounds_keep_each_forms_best_median(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    order: list[str] = []
    # Per round each form has 3 untimed warm-up calls and 3 timed ones; their cost varies by
    # round, and each form keeps its best round.
    costs = {
        "a": iter([n for n in (9, 5, 7) for _ in range(6)]),
        "b": iter([n for n in (8, 6, 2) for _ in range(6)]),
    }

    def form(name: str) -> Callable[[], None]:
        def run() -> None:
            order.append(name)
            for _ in range(next(costs[name])):
                next(_Event.clock)

        return run

    best = cuda_timing.best_alternating_ms([form("a"), form("b")], rounds=3, repeats=3)
    assert order == (["a"] * 6 + ["b"] * 6) * 3
    assert best == [6.0, 3.0]  # cost + 1 (the end event's tick) of each form's best round


def test_a_tool_report_names_the_command_device_and_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["ignored", "--tokens", "5184", "--out", "docs/bench/x"])
    rows = [{"tokens": 5184, "ms": 0.5}]
    path = cuda_timing.write_report(tmp_path / "sub" / "x", "tools/x_bench.py", rows, "GPU 1")
    assert path.name == "x.json"
    assert json.loads(path.read_text()) == {
        "command": "python tools/x_bench.py --tokens 5184 --out docs/bench/x",
        "device": "GPU 1",
        "torch": torch.__version__,
        "rows": rows,
    }


@pytest.mark.parametrize(
    "tool",
    [
        "attention_bench",
        "epilogue_choice_bench",
        "gemm_autotune_bench",
        "vit_mlp_bench",
        "memory_trace",
        "profile_stages",
        "pipeline_bench",
    ],
)
def test_a_timing_tool_without_cuda_says_so_before_it_starts(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.tool_modules import load_tool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [f"tools/{tool}.py", "--out", str(tmp_path / "report")])
    with pytest.raises(SystemExit, match=rf"tools/{tool}\.py measures CUDA kernels .* no CUDA device"):
        load_tool(tool).main()
    assert not list(tmp_path.iterdir())  # no report of nothing
