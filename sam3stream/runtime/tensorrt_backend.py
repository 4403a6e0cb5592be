"""The TensorRT backend: runs the plans that runtime/tensorrt_build.py built.

Written against the TensorRT 10 Python API (name-based I/O tensors, ``execute_async_v3``) and
cuda-python's runtime bindings for memory, streams and events. TensorRT and cuda-python are
imported when a backend is opened (runtime/trt_runtime.py), never at module import, so the rest
of the package (and the pure logic in :mod:`sam3stream.runtime.trt_plan`) works without them.

Run path, per ``infer`` call, all on the backend's own CUDA stream::

    frames (host, pinned staging) --H2D--> vision --fpn0/1/2--> geometry --geo--> decoder
                                                     \\___________ fpn0/1/2 _______/
    decoder --D2H--> scores, boxes, presence, query_index; then only the kept masks

Device buffers are allocated once, for the largest batch and class count of the plans'
profiles; a smaller batch binds the same buffers with smaller shapes. A graph input that has
the name of an earlier graph's output is bound to that output's buffer, so the FPN maps and the
geometry features never leave the device. The four execution contexts run one after another on
one stream, so they borrow one scratch block for their activations (the largest plan's need)
instead of holding one each.

Masks: the decoder writes ``[B, C, K, M, M]`` densely. After the small outputs are copied back
and the stream synchronised, the rows whose score reaches ``min_score`` are selected on the host
and only those masks are copied, one ``cudaMemcpyAsync`` per run of consecutive masks (a
threshold of 0 copies everything in one go; a typical threshold copies a few hundred kilobytes
instead of the whole block: 531 MB (float32) at 1008 with batch 8, 4 classes and 50 queries, and the
buffers are sized for ``classes.max`` prompts, 2.1 GB of masks at the default 16).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.errors import (
    BackendUnavailableError,
    EngineDeadError,
    EngineMismatchError,
    InputError,
)
from sam3stream.runtime import trt_runtime
from sam3stream.runtime.contract import PAD_BOX_LABEL, check_frames
from sam3stream.runtime.manifest import (
    GRAPH_NAMES,
    EngineManifest,
    read_manifest,
)
from sam3stream.runtime.tokenize import PromptTokenizer
from sam3stream.runtime.trt_plan import (
    BATCH_AXIS,
    CLASS_AXIS,
    BufferSpec,
    ProfileShape,
    buffer_plan,
    check_bindings,
    check_build_record,
    check_plan_profiles,
    mask_runs,
    numpy_dtype,
    output_shapes,
    parse_cuda_device,
    read_build_record,
    require_tensorrt_dir,
    resolve_shape,
    total_bytes,
)
from sam3stream.runtime.trt_runtime import dtype_name, native_handle
from sam3stream.runtime.types import RawOutputs, TextFeatures

__all__ = ["TensorRTBackend"]

log = structlog.get_logger(__name__)

_DECODER_TO_HOST = ("scores", "boxes", "presence", "query_index")


def _pinned_array(ptr: int, shape: tuple[int, ...], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """A numpy view of page-locked host memory (freed by the backend, not by numpy)."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_byte * (count * dt.itemsize)).from_address(ptr)
    array: npt.NDArray[Any] = np.frombuffer(memoryview(raw), dtype=dt, count=count)
    return array.reshape(shape)


def _ptr(array: npt.NDArray[Any]) -> int:
    return int(array.ctypes.data)


@dataclass(slots=True)
class _Buffer:
    spec: BufferSpec
    ptr: int

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.spec.dtype)


# --------------------------------------------------------------------------- backend


class TensorRTBackend:
    """Implements :class:`sam3stream.runtime.types.Backend` with the plans of ``sam3stream build``.

    Not thread-safe (like every backend): open it on the thread that will call it. ``close()``
    frees every device allocation; ``last_timings`` holds the vision and decoder (geometry
    included) GPU times of the last ``infer``, from CUDA events.
    """

    def __init__(self, engine_dir: Path, device: str = "cuda:0") -> None:
        trt = trt_runtime.load_tensorrt()
        cuda = trt_runtime.CudaRuntime(trt_runtime.load_cudart())
        index = parse_cuda_device(device)
        self.engine_dir = Path(engine_dir)
        manifest = read_manifest(self.engine_dir)
        require_tensorrt_dir(manifest, self.engine_dir)
        record = read_build_record(self.engine_dir)
        check_build_record(manifest, record, self.engine_dir)
        self._trt = trt
        self._cuda = cuda
        self._manifest = manifest
        self._record = record
        self._device_index = index
        self.device = f"cuda:{index}"
        self.max_classes = record.classes.max
        self.last_timings: dict[str, float] = {}
        self._tokenizer = PromptTokenizer(self.engine_dir / manifest.tokenizer)
        self._runtime: Any = None
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._buffers: dict[str, _Buffer] = {}
        self._bound: dict[tuple[str, str], _Buffer] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        self._stream: Any = None
        self._stream_handle = 0
        self._events: list[Any] = []
        self._pinned = 0
        self._scratch = 0  # device scratch shared by the execution contexts
        self._scratch_bytes = 0
        self._scratch_saved = 0  # what separate blocks per context would have cost more
        self._frames_host: npt.NDArray[np.uint8] = np.zeros((0, 0, 0, 3), np.uint8)
        self._text_on_device: TextFeatures | None = None
        self._text_host: tuple[npt.NDArray[Any], ...] = ()
        self._closed = False
        self.gpu_name, self.compute_capability = cuda.open_device(index)
        try:
            self._load_plans()
            self._allocate()
            self._check_output_shapes()
        except BaseException:
            self.close()
            raise
        log.info(
            "tensorrt backend ready",
            engines=str(self.engine_dir),
            device=self.device,
            gpu=self.gpu_name,
            precision=manifest.precision,
            max_batch=record.batch.max,
            max_classes=record.classes.max,
            buffers_mib=round(total_bytes([b.spec for b in self._buffers.values()]) / 2**20, 1),
            scratch_mib=round(self._scratch_bytes / 2**20, 1),
            scratch_shared_saves_mib=round(self._scratch_saved / 2**20, 1),
        )

    # ------------------------------------------------------------------ loading

    def _load_plans(self) -> None:
        trt = self._trt
        try:  # a failed factory raises (pybind11's TypeError), never returns None
            self._runtime = trt.Runtime(trt_runtime.trt_logger(trt))
        except Exception as exc:
            raise BackendUnavailableError(
                f"TensorRT could not create a runtime on this GPU (see its messages above): {exc}"
            ) from exc
        if str(trt.__version__) != self._record.tensorrt_version:
            log.warning(
                "plans built by another TensorRT version; loading them may fail",
                built_by=self._record.tensorrt_version,
                installed=str(trt.__version__),
            )
        for name in GRAPH_NAMES:
            graph = self._manifest.graphs[name]
            path = self.engine_dir / graph.file
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                built_on = f" on {self._record.device}" if self._record.device else ""
                raise EngineMismatchError(
                    f"TensorRT {trt.__version__} cannot load {path}: it was built by TensorRT "
                    f"{self._record.tensorrt_version}{built_on} (compute capability "
                    f"{self._record.compute_capability or '?'}; this GPU is {self.gpu_name or '?'}, "
                    f"{self.compute_capability or '?'}). Plans load only into the TensorRT version and GPU "
                    f"architecture that built them: rebuild with `sam3stream build {self._record.source} "
                    f"--out {self.engine_dir}` here"
                )
            self._engines[name] = engine
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
            on_host = [n for n in names if engine.get_tensor_location(n) != trt.TensorLocation.DEVICE]
            if on_host:
                # Every binding is given a device pointer; a host (shape) tensor would be misread.
                raise EngineMismatchError(
                    f"{path} has tensors TensorRT keeps on the host ({', '.join(on_host)}); the "
                    "backend binds every tensor in device memory: build the plans with `sam3stream "
                    "build` from this package's ONNX graphs"
                )
            check_bindings(
                name,
                graph,
                [(n, n in inputs, numpy_dtype(dtype_name(engine.get_tensor_dtype(n))).name) for n in names],
                path,
            )
            actual = {}
            for n in sorted(inputs):
                low, opt, high = engine.get_tensor_profile_shape(n, 0)
                actual[n] = ProfileShape(min=_dims(low), opt=_dims(opt), max=_dims(high))
            check_plan_profiles(name, self._record.profiles[name], actual, path)
            # Scratch memory comes from the backend (_allocate): one block for all four contexts.
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise BackendUnavailableError(
                    f"TensorRT could not create an execution context for {path} (out of GPU memory?)"
                )
            self._contexts[name] = context

    def _allocate(self) -> None:
        cuda = self._cuda
        axes = {BATCH_AXIS: self._record.batch, CLASS_AXIS: self._record.classes}
        self._stream = cuda.stream()
        self._stream_handle = native_handle(self._stream)
        self._events = [cuda.event() for _ in range(3)]
        # The contexts never run at the same time (one stream, in order), so their activations
        # can live in one block; separately they would cost the sum of the four needs.
        needs = {name: int(engine.device_memory_size_v2) for name, engine in self._engines.items()}
        self._scratch_bytes = max(needs.values())
        self._scratch = cuda.malloc(max(self._scratch_bytes, 1))
        self._scratch_saved = sum(needs.values()) - self._scratch_bytes
        for context in self._contexts.values():
            context.set_device_memory(self._scratch, self._scratch_bytes)
        for spec in buffer_plan(self._manifest, axes):
            buffer = _Buffer(spec, cuda.malloc(max(spec.nbytes, 1)))
            self._buffers[spec.key] = buffer
            for graph, tensor in spec.bindings:
                if not self._contexts[graph].set_tensor_address(tensor, buffer.ptr):
                    raise EngineMismatchError(f"the {graph} plan refused a device address for {tensor}")
                self._bound[(graph, tensor)] = buffer
        r, batch = self._manifest.resolution, self._record.batch.max
        self._pinned = cuda.malloc_host(batch * r * r * 3)
        self._frames_host = _pinned_array(self._pinned, (batch, r, r, 3), np.uint8)
        # The geometry encoder's one padding box: the same for every frame, uploaded once.
        boxes = self._bound[("geometry", "boxes")]
        labels = self._bound[("geometry", "box_labels")]
        box_host = np.zeros(boxes.spec.max_shape, boxes.dtype)
        label_host = np.full(labels.spec.max_shape, PAD_BOX_LABEL, labels.dtype)
        cuda.upload(boxes.ptr, _ptr(box_host), box_host.nbytes, self._stream)
        cuda.upload(labels.ptr, _ptr(label_host), label_host.nbytes, self._stream)
        cuda.synchronize(self._stream)

    def _check_output_shapes(self) -> None:
        """At the largest shapes, each plan's outputs must fit the buffers planned for them."""
        batch, classes = self._record.batch.max, self._record.classes.max
        for graph in GRAPH_NAMES:
            self._set_shapes(graph, batch, classes)
            want = output_shapes(self._manifest, graph, batch, classes)
            for name, shape in want.items():
                got = tuple(_dims(self._contexts[graph].get_tensor_shape(name)))
                if got != shape:
                    raise EngineMismatchError(
                        f"{self.engine_dir}: the {graph} plan gives {name} {list(got)} for batch {batch} and "
                        f"{classes} classes, the manifest {list(shape)}; build the directory again"
                    )

    # ------------------------------------------------------------------ running

    @property
    def manifest(self) -> EngineManifest:
        return self._manifest

    def _require_open(self) -> None:
        if self._closed:
            raise EngineDeadError("the tensorrt backend is closed")

    def _check_classes(self, classes: int) -> None:
        if not 1 <= classes <= self.max_classes:
            raise EngineMismatchError(
                f"{classes} prompts, but the TensorRT plans in {self.engine_dir} take 1..{self.max_classes} "
                f"classes; rebuild with `sam3stream build {self._record.source} --max-classes {classes}`"
            )

    def _set_shapes(self, graph: str, batch: int, classes: int) -> None:
        if self._shapes.get(graph) == (batch, classes):
            return
        sizes = {BATCH_AXIS: batch, CLASS_AXIS: classes}
        context = self._contexts[graph]
        for spec in self._manifest.graphs[graph].inputs:
            shape = resolve_shape(spec.shape, sizes, f"{graph} input {spec.name}")
            if not context.set_input_shape(spec.name, shape):
                raise EngineMismatchError(
                    f"the {graph} plan refuses {spec.name} of shape {list(shape)}: outside the profile "
                    f"{self._record.profiles[graph][spec.name].describe()}"
                )
        self._shapes[graph] = (batch, classes)

    def _run(self, graph: str) -> None:
        if not self._contexts[graph].execute_async_v3(self._stream_handle):
            raise EngineDeadError(f"TensorRT failed to run the {graph} plan (see its messages above)")

    def _upload(self, graph: str, tensor: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        buffer = self._bound[(graph, tensor)]
        host = np.ascontiguousarray(array, dtype=buffer.dtype)
        if host.nbytes > buffer.spec.nbytes:
            raise InputError(
                f"{graph} input {tensor} {list(host.shape)} does not fit {list(buffer.spec.max_shape)}"
            )
        self._cuda.upload(buffer.ptr, _ptr(host), host.nbytes, self._stream)
        return host  # the caller keeps it alive until the stream is synchronised

    def _download(self, graph: str, tensor: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
        buffer = self._bound[(graph, tensor)]
        host = np.empty(shape, buffer.dtype)
        self._cuda.download(_ptr(host), buffer.ptr, host.nbytes, self._stream)
        return host

    def encode_text(self, prompts: list[str]) -> TextFeatures:
        self._require_open()
        ids, mask = self._tokenizer.encode(prompts)
        classes = len(prompts)
        self._check_classes(classes)
        self._cuda.set_device(self._device_index)
        self._set_shapes("text", 1, classes)
        keep = [self._upload("text", "input_ids", ids), self._upload("text", "attention_mask", mask)]
        self._run("text")
        (shape,) = output_shapes(self._manifest, "text", 1, classes).values()
        features = self._download("text", "text_features", shape)
        self._cuda.synchronize(self._stream)
        del keep
        return TextFeatures(
            prompts=tuple(prompts), features=features.astype(np.float32), mask=mask.astype(bool)
        )

    def _upload_text(self, text: TextFeatures) -> None:
        if text is self._text_on_device:
            return
        classes = text.num_classes
        context = self._manifest.model.text_context
        if text.features.shape[:2] != (classes, context) or text.mask.shape != (classes, context):
            raise InputError(
                f"text features {list(text.features.shape)} / mask {list(text.mask.shape)} do not fit "
                f"{classes} prompts of {context} tokens"
            )
        self._text_host = (
            self._upload("decoder", "text_features", text.features),
            self._upload("decoder", "text_mask", text.mask),
        )
        self._text_on_device = text

    def infer(self, frames: npt.NDArray[np.uint8], text: TextFeatures, min_score: float) -> RawOutputs:
        self._require_open()
        check_frames(frames, self._manifest)
        batch, classes = int(frames.shape[0]), text.num_classes
        self._check_classes(classes)
        cuda, stream = self._cuda, self._stream
        cuda.set_device(self._device_index)
        np.copyto(self._frames_host[:batch], frames)
        try:
            return self._infer_queued(batch, classes, text, min_score)
        except BaseException:
            # The upload from the pinned frames may still be in flight: the next call rewrites them.
            with contextlib.suppress(Exception):
                cuda.synchronize(stream)
            raise

    def _infer_queued(self, batch: int, classes: int, text: TextFeatures, min_score: float) -> RawOutputs:
        cuda, stream = self._cuda, self._stream
        start, after_vision, after_decoder = self._events
        frames_buf = self._bound[("vision", "frames")]
        cuda.upload(frames_buf.ptr, self._pinned, batch * self._frames_host[0].nbytes, stream)
        self._upload_text(text)
        self._set_shapes("vision", batch, classes)
        self._set_shapes("geometry", batch, classes)
        self._set_shapes("decoder", batch, classes)

        cuda.record(start, stream)
        self._run("vision")
        cuda.record(after_vision, stream)
        self._run("geometry")
        self._run("decoder")
        cuda.record(after_decoder, stream)

        shapes = output_shapes(self._manifest, "decoder", batch, classes)
        host = {name: self._download("decoder", name, shapes[name]) for name in _DECODER_TO_HOST}
        cuda.synchronize(stream)

        scores = host["scores"].astype(np.float32, copy=False)
        index = np.argwhere(scores >= min_score).astype(np.int64)
        masks_buf = self._bound[("decoder", "masks")]
        size = shapes["masks"][-1]
        masks = np.empty((len(index), size, size), masks_buf.dtype)
        per_mask = size * size * masks_buf.dtype.itemsize
        for first, row, count in mask_runs(index, classes, self._manifest.queries):
            cuda.download(
                _ptr(masks) + row * per_mask, masks_buf.ptr + first * per_mask, count * per_mask, stream
            )
        cuda.synchronize(stream)

        self.last_timings = {
            "vision": cuda.elapsed_ms(start, after_vision),
            "decoder": cuda.elapsed_ms(after_vision, after_decoder),
        }
        return RawOutputs(
            scores=scores,
            boxes=host["boxes"].astype(np.float32, copy=False),
            presence=host["presence"].astype(np.float32, copy=False),
            query_index=host["query_index"].astype(np.int64, copy=False),
            masks=masks.astype(np.float32, copy=False),
            mask_index=index,
        )

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Free the device buffers, pinned memory, events, stream and TensorRT objects. Idempotent."""
        if self._closed:
            return
        self._closed = True
        cuda = self._cuda
        steps: list[tuple[str, Callable[[], None]]] = []
        if self._stream is not None or self._buffers:
            # Frees and destructors act on the current device: close may run on another thread.
            steps.append(("set device", functools.partial(cuda.set_device, self._device_index)))
        if self._stream is not None:
            stream = self._stream
            steps.append(("synchronize", lambda: cuda.synchronize(stream)))
        # TensorRT objects go first (contexts before engines before the runtime), memory after.
        steps.append(("contexts", self._contexts.clear))
        steps.append(("engines", self._engines.clear))
        steps.append(("runtime", self._drop_runtime))
        for key, buffer in list(self._buffers.items()):
            steps.append((f"free {key}", functools.partial(cuda.free, buffer.ptr)))
        if self._scratch:
            steps.append(("free scratch", functools.partial(cuda.free, self._scratch)))
        if self._pinned:
            steps.append(("free pinned frames", functools.partial(cuda.free_host, self._pinned)))
        for event in self._events:
            steps.append(("destroy event", functools.partial(cuda.destroy_event, event)))
        if self._stream is not None:
            steps.append(("destroy stream", functools.partial(cuda.destroy_stream, self._stream)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # free what can be freed; report the rest
                log.warning("tensorrt close step failed", step=what, error=str(exc))
        self._buffers.clear()
        self._bound.clear()
        self._events = []
        self._stream = None
        self._pinned = 0
        self._scratch = 0
        self._frames_host = np.zeros((0, 0, 0, 3), np.uint8)
        self._text_on_device = None

    def _drop_runtime(self) -> None:
        self._runtime = None

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dims(dims: Any) -> list[int]:
    return [int(d) for d in dims]
