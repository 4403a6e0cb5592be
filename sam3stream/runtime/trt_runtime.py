"""Importing TensorRT and cuda-python, and the few CUDA runtime calls the TensorRT backend
(runtime/tensorrt_backend.py) and its builder (runtime/tensorrt_build.py) make.

Both packages are imported when a backend is opened or a build starts, never at module import,
so the rest of the package works without them.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from typing import Any

from sam3stream.errors import BackendUnavailableError

__all__ = [
    "INSTALL_HINT",
    "MIN_TENSORRT",
    "CudaError",
    "CudaRuntime",
    "driver_loads",
    "dtype_name",
    "load_cudart",
    "load_tensorrt",
    "native_handle",
    "trt_logger",
]

INSTALL_HINT = (
    "install it on a machine with an NVIDIA GPU and driver, matching the driver's CUDA major version: "
    "pip install 'tensorrt-cu12>=10.14,<11' 'cuda-python>=12.6,<13' for a CUDA 12 driver, or "
    "'tensorrt-cu13>=10.14,<11' 'cuda-python>=13' for a CUDA 13 one (10.14 or later for ONNX's "
    "Attention operator; TensorRT 11 has no FP16 builder flag)"
)
# What the backend calls first appeared in TensorRT 10.1 (device_memory_size_v2, set_device_memory).
MIN_TENSORRT = (10, 1)


class CudaError(RuntimeError):
    """A CUDA runtime call failed while the backend was running (the worker treats it as fatal)."""


def load_tensorrt() -> Any:
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        raise BackendUnavailableError(
            f"the tensorrt backend needs TensorRT, which is not installed here ({exc}); {INSTALL_HINT}"
        ) from exc
    version = str(getattr(trt, "__version__", "0"))
    if _version(version) < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {version} is too old: the tensorrt backend uses the TensorRT "
            f"{'.'.join(map(str, MIN_TENSORRT))}+ API; {INSTALL_HINT}"
        )
    return trt


def load_cudart() -> Any:
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (12.6.1+), else ``cuda.cudart`` (before 13)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailableError(
        "the tensorrt backend needs cuda-python for device memory and streams: pip install cuda-python"
    )


def driver_loads() -> bool:
    """Whether the NVIDIA driver's library loads here. cuda-python 13 answers a missing driver
    with cudaErrorInsufficientDriver, as it answers one that is too old."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def native_handle(obj: Any) -> int:
    """A cuda-python object's address as an int (what execute_async_v3 takes for a stream).
    cuda-python 13 deprecates ``int(obj)`` for get_cuda_native_handle; older releases lack it."""
    if isinstance(obj, int):
        return obj
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def _version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string; a part that is not a number counts as 0."""
    major, minor, *_ = [int(p) if p.isdigit() else 0 for p in [*version.split(".")[:2], "0", "0"]]
    return major, minor


@functools.cache
def trt_logger(trt: Any) -> Any:
    """One logger per process (TensorRT keeps the first one it is given)."""
    return trt.Logger(trt.Logger.WARNING)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode(errors="replace")
    return str(value)


def dtype_name(trt_dtype: Any) -> str:
    return str(getattr(trt_dtype, "name", trt_dtype))


class CudaRuntime:
    """The few cuda-python runtime calls the backend and the builder make, with their error
    tuples checked."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self._success = rt.cudaError_t.cudaSuccess
        self._h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

    def describe(self, err: Any) -> str:
        try:
            name = _text(self.rt.cudaGetErrorName(err)[1])
            text = _text(self.rt.cudaGetErrorString(err)[1])
        except Exception:  # error formatting must never hide the error itself
            return str(err)
        return f"{name}: {text}"

    def check(self, what: str, result: Any) -> Any:
        """cuda-python returns ``(err, value...)``; raise on an error, return the value(s)."""
        err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self._success:
            raise CudaError(f"{what} failed: {self.describe(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def open_device(self, index: int) -> tuple[str, str]:
        """Make ``index`` current on this thread; its name and compute capability."""
        try:
            result = self.rt.cudaGetDeviceCount()
        except (RuntimeError, OSError) as exc:  # some cuda-python releases raise when libcuda is missing
            raise BackendUnavailableError(
                f"the CUDA driver could not be loaded ({exc}); "
                "the tensorrt backend needs an NVIDIA GPU and its driver"
            ) from exc
        count = int(result[1]) if result[0] == self._success else 0
        if count == 0:
            why = self.describe(result[0]) if result[0] != self._success else "no device found"
            advice = "the tensorrt backend needs an NVIDIA GPU and its driver"
            if "InsufficientDriver" in why and not driver_loads():
                advice = "no NVIDIA driver is installed here (libcuda.so.1 does not load); " + advice
            elif "InsufficientDriver" in why:
                advice = (
                    "the driver is older than this cuda-python / TensorRT build needs: update the "
                    "driver, or install the packages for its CUDA version; " + INSTALL_HINT
                )
            raise BackendUnavailableError(f"no CUDA device is usable here ({why}); {advice}")
        if index >= count:
            raise BackendUnavailableError(
                f"cuda:{index} was asked for but this machine has {count} CUDA device(s): "
                f"cuda:0..cuda:{count - 1}"
            )
        self.set_device(index)
        return self.properties(index)

    def set_device(self, index: int) -> None:
        self.check("cudaSetDevice", self.rt.cudaSetDevice(index))

    def properties(self, index: int) -> tuple[str, str]:
        try:
            prop = self.check("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(index))
            return _text(prop.name), f"{prop.major}.{prop.minor}"
        except Exception:  # only informative
            return "", ""

    def malloc(self, nbytes: int) -> int:
        return int(self.check(f"cudaMalloc({nbytes})", self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self.check("cudaFree", self.rt.cudaFree(ptr))

    def malloc_host(self, nbytes: int) -> int:
        return int(self.check(f"cudaMallocHost({nbytes})", self.rt.cudaMallocHost(nbytes)))

    def free_host(self, ptr: int) -> None:
        self.check("cudaFreeHost", self.rt.cudaFreeHost(ptr))

    def stream(self) -> Any:
        # Non-blocking: a stream that never waits on work others queue on the legacy default stream.
        flags = self.rt.cudaStreamNonBlocking
        return self.check("cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags(flags))

    def destroy_stream(self, stream: Any) -> None:
        self.check("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def synchronize(self, stream: Any) -> None:
        self.check("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def upload(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self.check(
                "cudaMemcpyAsync (to the device)",
                self.rt.cudaMemcpyAsync(dst, src, nbytes, self._h2d, stream),
            )

    def download(self, dst: int, src: int, nbytes: int, stream: Any) -> None:
        if nbytes:
            self.check(
                "cudaMemcpyAsync (to the host)", self.rt.cudaMemcpyAsync(dst, src, nbytes, self._d2h, stream)
            )

    def event(self) -> Any:
        return self.check("cudaEventCreate", self.rt.cudaEventCreate())

    def record(self, event: Any, stream: Any) -> None:
        self.check("cudaEventRecord", self.rt.cudaEventRecord(event, stream))

    def elapsed_ms(self, start: Any, end: Any) -> float:
        elapsed = getattr(self.rt, "cudaEventElapsedTime", None) or self.rt.cudaEventElapsedTime_v2
        return float(self.check("cudaEventElapsedTime", elapsed(start, end)))

    def destroy_event(self, event: Any) -> None:
        self.check("cudaEventDestroy", self.rt.cudaEventDestroy(event))
