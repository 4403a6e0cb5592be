"""GPU memory of this process as the driver sees it (NVML: CUDA context included).

One query for the service's metrics and for the benchmarks. The allocator's own figures
(torch.cuda.max_memory_allocated) leave out the CUDA context, cuBLAS/cuDNN workspaces and
fragmentation, which decide whether a deployment fits a card; NVML counts them.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

__all__ = ["process_gpu_memory"]

log = structlog.get_logger(__name__)

_state: dict[str, bool] = {}


def process_gpu_memory(device_used_fallback: bool = False) -> int | None:
    """Bytes of GPU memory this process holds over all NVIDIA devices, or None.

    None when there is no driver, pynvml is missing, or the driver does not list this process.
    Some virtualised drivers and containers list no (or host) process ids; with
    ``device_used_fallback`` the devices' used memory stands in then, which is right only where
    this process has the GPUs to itself (a benchmark), not for a service sharing a card.
    """
    if _state.get("failed"):
        return None
    try:
        import pynvml

        if not _state.get("ready"):
            pynvml.nvmlInit()
            _state["ready"] = True
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        own = _listed_bytes(pynvml, handles, os.getpid())
        if own is not None or not device_used_fallback:
            return own
        return sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).used) for h in handles)
    except Exception as exc:
        # No driver is the normal case on CPU hosts: say so once, then stop asking.
        _state["failed"] = True
        log.info("gpu_memory_unavailable", error=repr(exc))
        return None


def _listed_bytes(pynvml: Any, handles: list[Any], pid: int) -> int | None:
    """The memory NVML lists for ``pid`` over ``handles``; None if it lists the process nowhere."""
    total, found = 0, False
    for handle in handles:
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                total += int(proc.usedGpuMemory)
                found = True
    return total if found else None
