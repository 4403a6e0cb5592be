"""process_gpu_memory against a stand-in pynvml: which figure it reports, and when it gives up."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from sam3stream import gpu_memory
from sam3stream.gpu_memory import process_gpu_memory

MIB = 1 << 20


def fake_nvml(devices: list[dict[str, Any]], calls: list[str]) -> types.ModuleType:
    """A pynvml with ``devices``: each {"used": bytes, "procs": [(pid, bytes | None), ...]}."""
    module = types.ModuleType("pynvml")

    def init() -> None:
        calls.append("init")

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: devices[i]  # type: ignore[attr-defined]
    module.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in h["procs"]
    ]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=h["used"])  # type: ignore[attr-defined]
    return module


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(gpu_memory, "_state", {})
    yield


def install(monkeypatch: pytest.MonkeyPatch, devices: list[dict[str, Any]]) -> list[str]:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices, calls))
    return calls


def test_sums_this_process_over_devices_and_ignores_others(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    calls = install(
        monkeypatch,
        [
            {"used": 9000 * MIB, "procs": [(me, 3000 * MIB), (me + 1, 5000 * MIB)]},
            {"used": 700 * MIB, "procs": [(me, 500 * MIB)]},
        ],
    )
    assert process_gpu_memory() == 3500 * MIB
    assert process_gpu_memory(device_used_fallback=True) == 3500 * MIB
    assert calls == ["init"]  # initialised once, not per query


def test_hidden_pids_give_none_unless_the_device_figure_may_stand_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, [{"used": 4096 * MIB, "procs": [(1, 4000 * MIB)]}])
    assert process_gpu_memory() is None
    assert process_gpu_memory(device_used_fallback=True) == 4096 * MIB


def test_a_listed_process_without_a_figure_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, [{"used": 100 * MIB, "procs": [(os.getpid(), None)]}])
    assert process_gpu_memory() is None


def test_no_driver_gives_none_and_stops_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = install(monkeypatch, [])

    def broken() -> None:
        calls.append("init")
        raise RuntimeError("NVML Shared Library Not Found")

    sys.modules["pynvml"].nvmlInit = broken  # type: ignore[attr-defined]
    assert process_gpu_memory(device_used_fallback=True) is None
    assert process_gpu_memory() is None
    assert calls == ["init"]
