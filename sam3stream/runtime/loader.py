"""Pick a backend by name; each one is imported only when chosen (torch stays out otherwise)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from sam3stream.errors import BackendUnavailableError
from sam3stream.runtime.types import Backend

__all__ = ["BACKENDS", "open_backend"]

BACKENDS = ("onnxruntime", "torch", "tensorrt", "fake")
COMPILE_CACHE_DIR = "compile-cache"  # inside an engine directory

# What to install when a backend's dependency is missing.
_INSTALL = {
    "onnxruntime": "pip install onnxruntime (or onnxruntime-gpu)",
    "torch": "pip install 'sam3stream[gpu]' (torch and cuda-python)",
    "tensorrt": "pip install 'sam3stream[tensorrt]' (tensorrt and cuda-python)",
}


# kind -> (module, class, whether the constructor takes device=)
_CLASSES = {
    "onnxruntime": ("sam3stream.runtime.onnxruntime_backend", "OnnxRuntimeBackend", True),
    "torch": ("sam3stream.runtime.torch_backend", "TorchBackend", True),
    "tensorrt": ("sam3stream.runtime.tensorrt_backend", "TensorRTBackend", True),
}


def open_backend(
    kind: str,
    engine_dir: Path,
    device: str = "cpu",
    precision: str | None = None,
    overlap: bool = False,
    fused_gelu: bool | None = None,
    typical_batch: int | None = None,
    compile_cache: bool = False,
) -> Backend:
    """Load the engines in ``engine_dir`` with the ``kind`` runtime on ``device``.

    ``precision`` (bf16, fp16, fp32) goes to backends that take it (torch: as
    ``TorchOptions(precision=...)``); the others run at the precision their engines
    were made with. ``overlap``, ``fused_gelu`` and ``typical_batch`` are the torch backend's
    ``TorchOptions``; ``compile_cache`` gives it ``engine_dir/compile-cache`` for its compiled
    kernels (``TorchOptions.compile_cache``).
    """
    engine_dir = Path(engine_dir)
    if kind == "fake":
        from sam3stream.runtime.fake import FakeBackend

        return FakeBackend.from_dir(engine_dir)
    if kind not in _CLASSES:
        raise BackendUnavailableError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name, takes_device = _CLASSES[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise BackendUnavailableError(f"this sam3stream build has no {kind} backend") from exc
        raise BackendUnavailableError(
            f"the {kind} backend needs the Python module {exc.name or exc!s}: {_INSTALL[kind]}"
        ) from exc
    cls = getattr(module, class_name)
    kwargs: dict[str, str] = {"device": device} if takes_device else {}
    params = inspect.signature(cls).parameters
    extra: dict[str, object] = {}
    if precision is not None and "precision" in params:
        extra["precision"] = precision
    elif "options" in params and hasattr(module, "TorchOptions"):
        chosen = {"precision": precision} if precision is not None else {}
        extra["options"] = module.TorchOptions(
            **chosen,
            overlap=overlap,
            fused_gelu=fused_gelu,
            typical_batch=typical_batch,
            compile_cache=str(engine_dir / COMPILE_CACHE_DIR) if compile_cache else None,
        )
    backend: Backend = cls(engine_dir, **kwargs, **extra)
    return backend
