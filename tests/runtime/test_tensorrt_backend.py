"""The TensorRT backend and `sam3stream build`.

Three layers of tests:

- Without TensorRT (every machine): a stand-in ``tensorrt`` module that "builds" a plan by
  storing the ONNX graph and "runs" it with onnxruntime, behind the same calls TensorRT 10 has.
  With a host-memory stand-in for cuda-python's runtime, the whole backend runs on a CPU:
  buffer chaining, partial batches in max-size buffers, mask selection, errors, cleanup.
- ``gpu``: the same, but with the real cuda-python runtime on a real device (the stand-in
  TensorRT copies its inputs off the device and its outputs back), so every CUDA call the
  backend makes is a real one.
- ``tensorrt``: real TensorRT, skipped where ``import tensorrt`` fails (as in CI here): build the
  synthetic graphs and the tiny SAM 3 export and compare with onnxruntime.

The synthetic engine directory holds four small ONNX graphs with the names, shapes and dtypes of
the real export (uint8 frames, bool masks, int64 ids, dynamic batch and classes), made with
``onnx.helper``, so no torch is needed.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sam3stream.cli import main
from sam3stream.errors import BackendUnavailableError, EngineMismatchError, InputError
from sam3stream.runtime import trt_runtime
from sam3stream.runtime.loader import open_backend
from sam3stream.runtime.manifest import (
    EngineManifest,
    GraphSpec,
    ModelSpec,
    TensorSpec,
    read_manifest,
    write_manifest,
)
from sam3stream.runtime.onnxruntime_backend import OnnxRuntimeBackend
from sam3stream.runtime.tensorrt_backend import TensorRTBackend
from sam3stream.runtime.tensorrt_build import TensorRTBuildError, build_engine_dir
from sam3stream.runtime.trt_plan import BUILD_RECORD_NAME, read_build_record, write_build_record
from sam3stream.runtime.types import Backend, RawOutputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RES, BATCH, QUERIES, HIDDEN = 56, 4, 5, 8  # grid 4, masks 16 x 16
PROMPTS = ["person", "car", "dog"]


# --------------------------------------------------------------------------- a small ONNX engine directory


def _const(name: str, array: np.ndarray) -> Any:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _axes(name: str, *axes: int) -> Any:
    return _const(name, np.array(axes, np.int64))


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any]) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _vi(name: str, elem: int, shape: list[int | str]) -> Any:
    return helper.make_tensor_value_info(name, elem, shape)


def write_synthetic_graphs(
    out: Path, resolution: int = RES, queries: int = QUERIES, hidden: int = HIDDEN
) -> None:
    g = resolution // 14
    m = 4 * g
    rng = np.random.default_rng(7)
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    conv = {f"w{i}": rng.standard_normal((hidden, 3, 1, 1)).astype(np.float32) for i in range(3)}

    _save(
        out / "vision.onnx",
        [
            helper.make_node("Cast", ["frames"], ["xf"], to=f32),
            _const("inv255", np.array(1 / 255, np.float32)),
            helper.make_node("Mul", ["xf", "inv255"], ["xs"]),
            helper.make_node("Transpose", ["xs"], ["x"], perm=[0, 3, 1, 2]),
            helper.make_node("AveragePool", ["x"], ["p2"], kernel_shape=[14, 14], strides=[14, 14]),
            helper.make_node("AveragePool", ["x"], ["p1"], kernel_shape=[7, 7], strides=[7, 7]),
            *[_const(k, v) for k, v in conv.items()],
            helper.make_node("Conv", ["p2", "w2"], ["fpn2"]),
            helper.make_node("Conv", ["p1", "w1"], ["fpn1"]),
            helper.make_node("Conv", ["p1", "w0"], ["c0"]),
            _const("scales", np.array([1, 1, 2, 2], np.float32)),
            helper.make_node("Resize", ["c0", "", "scales"], ["fpn0"], mode="nearest"),
        ],
        [_vi("frames", TensorProto.UINT8, ["batch", resolution, resolution, 3])],
        [
            _vi("fpn0", f32, ["batch", hidden, 4 * g, 4 * g]),
            _vi("fpn1", f32, ["batch", hidden, 2 * g, 2 * g]),
            _vi("fpn2", f32, ["batch", hidden, g, g]),
        ],
    )
    _save(
        out / "geometry.onnx",
        [
            helper.make_node("ReduceMean", ["fpn2"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("ReduceMean", ["boxes"], ["bm"], axes=[2], keepdims=0),
            helper.make_node("Add", ["m", "bm"], ["mb"]),
            _axes("ax1", 1),
            helper.make_node("Unsqueeze", ["mb", "ax1"], ["g1"]),
            _const("half", np.array(0.5, np.float32)),
            helper.make_node("Mul", ["g1", "half"], ["g2"]),
            helper.make_node("Concat", ["g1", "g2"], ["geo_features"], axis=1),
            helper.make_node("Cast", ["box_labels"], ["lab"], to=f32),
            _const("twenty", np.array(20, np.float32)),
            helper.make_node("Add", ["lab", "twenty"], ["lab2"]),
            helper.make_node("Concat", ["lab", "lab2"], ["cat"], axis=1),
            _const("zero", np.array(0, np.float32)),
            helper.make_node("Less", ["cat", "zero"], ["geo_mask"]),
        ],
        [
            _vi("fpn2", f32, ["batch", hidden, g, g]),
            _vi("boxes", f32, ["batch", 1, 4]),
            _vi("box_labels", i64, ["batch", 1]),
        ],
        [_vi("geo_features", f32, ["batch", 2, hidden]), _vi("geo_mask", TensorProto.BOOL, ["batch", 2])],
    )
    _save(
        out / "text.onnx",
        [
            helper.make_node("Cast", ["input_ids"], ["idf"], to=f32),
            helper.make_node("Cast", ["attention_mask"], ["mf"], to=f32),
            helper.make_node("Mul", ["idf", "mf"], ["t0"]),
            _const("milli", np.array(1e-3, np.float32)),
            helper.make_node("Mul", ["t0", "milli"], ["t1"]),
            _axes("ax2", 2),
            helper.make_node("Unsqueeze", ["t1", "ax2"], ["t2"]),
            _const("ramp", (np.arange(hidden, dtype=np.float32) + 1).reshape(1, 1, hidden)),
            helper.make_node("Mul", ["t2", "ramp"], ["text_features"]),
        ],
        [_vi("input_ids", i64, ["classes", 32]), _vi("attention_mask", i64, ["classes", 32])],
        [_vi("text_features", f32, ["classes", 32, hidden])],
    )
    _save(
        out / "decoder.onnx",
        [
            helper.make_node("ReduceMean", ["fpn0"], ["s0"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("ReduceMean", ["fpn1"], ["s1"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("ReduceMean", ["fpn2"], ["s2"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("ReduceMean", ["geo_features"], ["sg"], axes=[1, 2], keepdims=0),
            helper.make_node("Cast", ["geo_mask"], ["gmf"], to=f32),
            helper.make_node("ReduceMean", ["gmf"], ["sgm"], axes=[1], keepdims=0),
            helper.make_node("Sum", ["s0", "s1", "s2", "sg", "sgm"], ["sb"]),
            helper.make_node("ReduceMean", ["text_features"], ["t"], axes=[1, 2], keepdims=0),
            helper.make_node("Cast", ["text_mask"], ["tmf"], to=f32),
            helper.make_node("ReduceMean", ["tmf"], ["tm"], axes=[1], keepdims=0),
            helper.make_node("Add", ["t", "tm"], ["tc"]),
            _axes("ax12", 1, 2),
            _axes("ax02", 0, 2),
            helper.make_node("Unsqueeze", ["sb", "ax12"], ["sb3"]),
            helper.make_node("Unsqueeze", ["tc", "ax02"], ["tc3"]),
            _const("gain", np.array(6, np.float32)),
            helper.make_node("Mul", ["sb3", "gain"], ["sb6"]),
            _const("koff", np.linspace(1.5, -3.5, queries, dtype=np.float32).reshape(1, 1, queries)),
            helper.make_node("Sum", ["sb6", "tc3", "koff"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["scores"]),
            _axes("ax3", 3),
            helper.make_node("Unsqueeze", ["scores", "ax3"], ["s4"]),
            _const("bscale", np.array([0.1, 0.2, 0.3, 0.4], np.float32)),
            helper.make_node("Mul", ["s4", "bscale"], ["boxes"]),
            helper.make_node("ReduceMax", ["scores"], ["presence"], axes=[2], keepdims=0),
            _const("thousand", np.array(1000, np.float32)),
            helper.make_node("Mul", ["scores", "thousand"], ["sq"]),
            helper.make_node("Cast", ["sq"], ["query_index"], to=i64),
            _axes("ax34", 3, 4),
            helper.make_node("Unsqueeze", ["scores", "ax34"], ["s5"]),
            helper.make_node("ReduceMean", ["fpn0"], ["plane"], axes=[1], keepdims=0),
            helper.make_node("Unsqueeze", ["plane", "ax12"], ["plane5"]),
            helper.make_node("Add", ["s5", "plane5"], ["masks"]),
        ],
        [
            _vi("fpn0", f32, ["batch", hidden, 4 * g, 4 * g]),
            _vi("fpn1", f32, ["batch", hidden, 2 * g, 2 * g]),
            _vi("fpn2", f32, ["batch", hidden, g, g]),
            _vi("text_features", f32, ["classes", 32, hidden]),
            _vi("text_mask", TensorProto.BOOL, ["classes", 32]),
            _vi("geo_features", f32, ["batch", 2, hidden]),
            _vi("geo_mask", TensorProto.BOOL, ["batch", 2]),
        ],
        [
            _vi("scores", f32, ["batch", "classes", queries]),
            _vi("boxes", f32, ["batch", "classes", queries, 4]),
            _vi("masks", f32, ["batch", "classes", queries, m, m]),
            _vi("presence", f32, ["batch", "classes"]),
            _vi("query_index", i64, ["batch", "classes", queries]),
        ],
    )


_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 2: "uint8"}


def _specs(values: Any) -> list[TensorSpec]:
    out = []
    for value in values:
        tensor = value.type.tensor_type
        shape: list[int | str] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        out.append(TensorSpec(value.name, shape, _DTYPES[tensor.elem_type]))
    return out


def make_onnx_engine(out: Path, batch: int = BATCH) -> Path:
    from sam3stream.model.tokenizer_files import write_tiny_tokenizer

    out.mkdir(parents=True)
    write_synthetic_graphs(out)
    write_tiny_tokenizer(out / "tokenizer")
    graphs = {}
    for name in ("vision", "text", "geometry", "decoder"):
        graph = onnx.load(str(out / f"{name}.onnx")).graph
        graphs[name] = GraphSpec(f"{name}.onnx", _specs(graph.input), _specs(graph.output))
    manifest = EngineManifest(
        resolution=RES,
        batch=batch,
        queries=QUERIES,
        precision="float32",
        model=ModelSpec("synthetic", "0" * 64, HIDDEN, 32, 200),
        graphs=graphs,
        tokenizer="tokenizer",
        versions={"sam3stream": "0.1.0"},
        created="2026-01-01T00:00:00+00:00",
    )
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def onnx_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx_engine(tmp_path_factory.mktemp("onnx") / f"b{BATCH}_q{QUERIES}_r{RES}")


def frames_for(batch: int, seed: int) -> np.ndarray:
    """Frames of different brightness: some detections pass 0.5, some do not."""
    rng = np.random.default_rng(seed)
    base = np.linspace(30, 220, batch).astype(np.int64)[:, None, None, None]
    noise = rng.integers(-25, 26, (batch, RES, RES, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ stand-ins for cuda-python and TensorRT


class FakeCudart:
    """cuda-python's runtime on host memory, checking that every copy stays inside an allocation."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToHost = 0
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.device_blocks: dict[int, Any] = {}
        self.host_blocks: dict[int, Any] = {}
        self.handles = 0
        self.events: dict[int, float] = {}
        self.streams: set[int] = set()

    def _ok(self, *values: Any) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaGetDeviceCount(self) -> tuple[Any, ...]:
        return self._ok(self.devices) if self.devices else (self.cudaError_t.cudaErrorNoDevice, 0)

    def cudaSetDevice(self, index: int) -> tuple[Any, ...]:
        return self._ok() if index < self.devices else (self.cudaError_t.cudaErrorInvalidValue,)

    def cudaGetDeviceProperties(self, index: int) -> tuple[Any, ...]:
        return self._ok(types.SimpleNamespace(name=b"Host Stand-in\0\0", major=9, minor=0))

    def cudaGetErrorName(self, err: Any) -> tuple[Any, ...]:
        return self._ok(self.cudaError_t(err).name.encode())

    def cudaGetErrorString(self, err: Any) -> tuple[Any, ...]:
        return self._ok(b"stand-in error")

    def _alloc(self, blocks: dict[int, Any], nbytes: int) -> tuple[Any, ...]:
        block = ctypes.create_string_buffer(nbytes)
        blocks[ctypes.addressof(block)] = block
        return self._ok(ctypes.addressof(block))

    def cudaMalloc(self, nbytes: int) -> tuple[Any, ...]:
        return self._alloc(self.device_blocks, nbytes)

    def cudaMallocHost(self, nbytes: int) -> tuple[Any, ...]:
        return self._alloc(self.host_blocks, nbytes)

    def cudaFree(self, ptr: int) -> tuple[Any, ...]:
        del self.device_blocks[ptr]
        return self._ok()

    def cudaFreeHost(self, ptr: int) -> tuple[Any, ...]:
        del self.host_blocks[ptr]
        return self._ok()

    def _inside_device(self, ptr: int, nbytes: int) -> bool:
        return any(base <= ptr and ptr + nbytes <= base + len(b) for base, b in self.device_blocks.items())

    def cudaMemcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> tuple[Any, ...]:
        to_device = kind in (
            self.cudaMemcpyKind.cudaMemcpyHostToDevice,
            self.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
        )
        from_device = kind in (
            self.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            self.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
        )
        assert self._inside_device(dst, nbytes) == to_device, "destination is not where the copy kind says"
        assert self._inside_device(src, nbytes) == from_device, "source is not where the copy kind says"
        ctypes.memmove(dst, src, nbytes)
        return self._ok()

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> tuple[Any, ...]:
        assert stream in self.streams
        return self.cudaMemcpy(dst, src, nbytes, kind)

    def _handle(self) -> int:
        self.handles += 1
        return self.handles

    cudaStreamNonBlocking = 1

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[Any, ...]:
        # Non-blocking: the backend's stream must not wait on the legacy default stream.
        assert flags == self.cudaStreamNonBlocking
        stream = self._handle()
        self.streams.add(stream)
        return self._ok(stream)

    def cudaStreamDestroy(self, stream: int) -> tuple[Any, ...]:
        self.streams.remove(stream)
        return self._ok()

    def cudaStreamSynchronize(self, stream: int) -> tuple[Any, ...]:
        assert stream in self.streams
        return self._ok()

    def cudaDeviceSynchronize(self) -> tuple[Any, ...]:
        return self._ok()

    def cudaEventCreate(self) -> tuple[Any, ...]:
        event = self._handle()
        self.events[event] = 0.0
        return self._ok(event)

    def cudaEventRecord(self, event: int, stream: int) -> tuple[Any, ...]:
        self.events[event] = time.perf_counter()
        return self._ok()

    def cudaEventElapsedTime(self, start: int, end: int) -> tuple[Any, ...]:
        return self._ok((self.events[end] - self.events[start]) * 1e3)

    def cudaEventDestroy(self, event: int) -> tuple[Any, ...]:
        del self.events[event]
        return self._ok()


class Counting:
    """Counts the calls made through a cuda-python runtime module (real or stand-in)."""

    def __init__(self, rt: Any) -> None:
        self._rt = rt
        self.calls: Counter[str] = Counter()
        self.order: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._rt, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args: Any) -> Any:
            self.calls[name] += 1
            self.order.append(name)
            return attr(*args)

        return call


class _DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"


_ORT_TYPES = {
    "tensor(float)": _DataType.FLOAT,
    "tensor(float16)": _DataType.HALF,
    "tensor(int32)": _DataType.INT32,
    "tensor(int64)": _DataType.INT64,
    "tensor(bool)": _DataType.BOOL,
    "tensor(uint8)": _DataType.UINT8,
}
_MAGIC = b"STAND-IN PLAN\n"


class _ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 with name:  and operator:  (parse_from_file): INVALID_GRAPH: {self._desc}"


def fake_tensorrt(cudart: Any, version: str = "10.14.1.48", fp16_flag: bool = True) -> Any:
    """A ``tensorrt`` module whose plans are ONNX graphs that onnxruntime runs on copies of device memory."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.executed = []  # type: ignore[attr-defined]  # (graph inputs, addresses) per execute, in order
    trt.DataType = _DataType  # type: ignore[attr-defined]
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")  # type: ignore[attr-defined]
    trt.TensorLocation = enum.Enum("TensorLocation", "DEVICE HOST")  # type: ignore[attr-defined]
    trt.on_host = set()  # type: ignore[attr-defined]  # tensor names a plan keeps on the host
    trt.unparsable = {}  # type: ignore[attr-defined]  # ONNX file name -> the parser's complaint
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 TF32" if fp16_flag else "TF32")  # type: ignore[attr-defined]
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")  # type: ignore[attr-defined]
    strategies = enum.Enum("ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
    trt.ExecutionContextAllocationStrategy = strategies  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            self.severity = severity

    class Network:
        def __init__(self) -> None:
            self.onnx = b""
            self.inputs: list[str] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> Any:
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            complaint = trt.unparsable.get(Path(path).name)  # type: ignore[attr-defined]
            if complaint is not None:
                self.errors.append(complaint)
                return False
            try:
                model = onnx.load(path)
            except Exception as exc:
                self.errors.append(f"cannot read {path}: {exc}")
                return False
            self.network.onnx = Path(path).read_bytes()
            self.network.inputs = [i.name for i in model.graph.input]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> Any:
            # TensorRT's is a ParserError: desc() and a __str__ that names the node and operator.
            return _ParserError(self.errors[i])

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[list[int]]] = {}

        def set_shape(
            self, name: str, low: tuple[int, ...], opt: tuple[int, ...], high: tuple[int, ...]
        ) -> None:
            self.shapes[name] = [list(low), list(opt), list(high)]

    class Config:
        def __init__(self) -> None:
            self.flags: set[Any] = set()
            self.profiles: list[Profile] = []
            self.pools: dict[Any, int] = {}

        def set_flag(self, flag: Any) -> None:
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool] = size

        def add_optimization_profile(self, profile: Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            assert flags == 0
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            (profile,) = config.profiles
            if set(profile.shapes) != set(network.inputs):
                return None
            header = {
                "version": version,
                "profile": profile.shapes,
                "fp16": any(f.name == "FP16" for f in config.flags),
            }
            return _MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

    class Context:
        def __init__(self, engine: Engine, strategy: Any) -> None:
            self.engine = engine
            self.strategy = strategy
            self.scratch: tuple[int, int] | None = None  # (address, bytes) given by the application
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_device_memory(self, ptr: int, size: int) -> None:
            assert self.strategy == strategies.USER_MANAGED, (
                "TensorRT refuses memory for a context that has its own"
            )
            self.scratch = (int(ptr), int(size))

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            low, _, high = self.engine.profile[name]
            if len(shape) != len(low) or any(
                not lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)
            ):
                return False
            self.shapes[name] = tuple(int(s) for s in shape)
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = int(ptr)
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.shapes:
                return self.shapes[name]
            sizes: dict[str, int] = {}
            for meta in self.engine.session.get_inputs():
                for dim, size in zip(meta.shape, self.shapes.get(meta.name, ()), strict=False):
                    if isinstance(dim, str):
                        sizes[dim] = size
            meta = next(o for o in self.engine.session.get_outputs() if o.name == name)
            return tuple(sizes.get(d, -1) if isinstance(d, str) else d for d in meta.shape)

        def execute_async_v3(self, stream_handle: int) -> bool:
            assert isinstance(stream_handle, int)
            if self.strategy == strategies.USER_MANAGED:
                assert self.scratch is not None, "a USER_MANAGED context ran without scratch memory"
                assert self.scratch[1] >= self.engine.device_memory_size_v2
            rt = cudart
            ok = rt.cudaError_t.cudaSuccess
            assert rt.cudaDeviceSynchronize()[0] == ok
            feeds = {}
            for meta in self.engine.session.get_inputs():
                host = np.empty(self.shapes[meta.name], _ORT_TYPES[meta.type].value)
                kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
                assert rt.cudaMemcpy(host.ctypes.data, self.addresses[meta.name], host.nbytes, kind)[0] == ok
                feeds[meta.name] = host
            outputs = self.engine.session.run(None, feeds)
            for meta, value in zip(self.engine.session.get_outputs(), outputs, strict=True):
                assert value.shape == self.get_tensor_shape(meta.name)
                value = np.ascontiguousarray(value)
                kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
                assert (
                    rt.cudaMemcpy(self.addresses[meta.name], value.ctypes.data, value.nbytes, kind)[0] == ok
                )
            # From pageable memory cudaMemcpy may return before its DMA lands, and the backend's
            # non-blocking stream does not wait for it: finish here, as TensorRT's own kernels
            # would have finished on the backend's stream before anything later on it.
            assert rt.cudaDeviceSynchronize()[0] == ok
            trt.executed.append((sorted(feeds), dict(self.addresses)))  # type: ignore[attr-defined]
            return True

    class Engine:
        def __init__(self, profile: dict[str, list[list[int]]], model: bytes) -> None:
            self.profile = profile
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            self.model_bytes = len(model)
            self.names = [m.name for m in self.session.get_inputs()] + [
                m.name for m in self.session.get_outputs()
            ]
            self.inputs = {m.name for m in self.session.get_inputs()}
            self.types = {
                m.name: _ORT_TYPES[m.type] for m in [*self.session.get_inputs(), *self.session.get_outputs()]
            }
            self.metas = {m.name: m for m in [*self.session.get_inputs(), *self.session.get_outputs()]}

        @property
        def num_io_tensors(self) -> int:
            return len(self.names)

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> Any:
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT  # type: ignore[attr-defined]

        def get_tensor_dtype(self, name: str) -> Any:
            return self.types[name]

        def get_tensor_location(self, name: str) -> Any:
            where = "HOST" if name in trt.on_host else "DEVICE"  # type: ignore[attr-defined]
            return trt.TensorLocation[where]  # type: ignore[attr-defined]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(-1 if isinstance(d, str) else d for d in self.metas[name].shape)

        def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
            assert index == 0
            return [tuple(s) for s in self.profile[name]]

        @property
        def device_memory_size_v2(self) -> int:
            # A stand-in need that differs between the graphs: their serialized size.
            return self.model_bytes

        def create_execution_context(self, strategy: Any = strategies.STATIC) -> Context:
            return Context(self, strategy)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
            if not data.startswith(_MAGIC):
                return None
            header, model = data[len(_MAGIC) :].split(b"\n", 1)
            meta = json.loads(header)
            if meta["version"] != version:
                return None  # what TensorRT does with another version's plan
            return Engine(meta["profile"], model)

    for cls in (Logger, OnnxParser, Builder, Runtime):
        setattr(trt, cls.__name__, cls)
    return trt


@pytest.fixture
def host_cuda(monkeypatch: pytest.MonkeyPatch) -> Counting:
    rt = Counting(FakeCudart())
    monkeypatch.setattr(trt_runtime, "load_cudart", lambda: rt)
    return rt


def _real_cudart() -> Any:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            module = __import__(name, fromlist=["_"])
        except ImportError:
            continue
        err, count = module.cudaGetDeviceCount()
        if err == module.cudaError_t.cudaSuccess and count > 0:
            return module
        return None
    return None


@pytest.fixture(params=["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def cuda_rt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Counting:
    """The runtime the backend gets: the host stand-in, or cuda-python on a real GPU."""
    if request.param == "host":
        rt = Counting(FakeCudart())
    else:
        real = _real_cudart()
        if real is None:
            pytest.skip("needs cuda-python and a CUDA device")
        rt = Counting(real)
    monkeypatch.setattr(trt_runtime, "load_cudart", lambda: rt)
    return rt


def use_tensorrt(monkeypatch: pytest.MonkeyPatch, trt: Any) -> None:
    monkeypatch.setattr(trt_runtime, "load_tensorrt", lambda: trt)


@pytest.fixture
def built(
    onnx_engine: Path, cuda_rt: Counting, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Path]:
    use_tensorrt(monkeypatch, fake_tensorrt(cuda_rt))
    yield build_engine_dir(onnx_engine, tmp_path / "trt", max_classes=8, opt_classes=2)


def assert_same_outputs(got: RawOutputs, want: RawOutputs) -> None:
    for name in ("scores", "boxes", "presence", "query_index", "masks", "mask_index"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)


# --------------------------------------------------------------------------- through the stand-ins


def test_a_graph_the_parser_refuses_names_the_file_and_the_reason(
    onnx_engine: Path, host_cuda: Counting, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trt = fake_tensorrt(host_cuda)
    trt.unparsable["decoder.onnx"] = "No importer registered for op: Attention"
    use_tensorrt(monkeypatch, trt)
    with pytest.raises(TensorRTBuildError) as info:
        build_engine_dir(onnx_engine, tmp_path / "trt", max_classes=8, opt_classes=2)
    message = str(info.value)
    assert f"cannot parse {onnx_engine / 'decoder.onnx'}: In node" in message
    assert "No importer registered for op: Attention" in message and "needs TensorRT 10.14" in message
    assert not (tmp_path / "trt").exists()


def test_build_writes_plans_manifest_and_record(onnx_engine: Path, built: Path) -> None:
    manifest = read_manifest(built)
    source = read_manifest(onnx_engine)
    assert manifest.engine_kind == "tensorrt" and manifest.precision == "fp16"
    assert {g.file for g in manifest.graphs.values()} == {
        "vision.plan",
        "text.plan",
        "geometry.plan",
        "decoder.plan",
    }
    assert manifest.model == source.model and manifest.versions["tensorrt"] == "10.14.1.48"
    assert all(len(g.sha256) == 64 for g in manifest.graphs.values())
    record = read_build_record(built)
    assert (record.batch.min, record.batch.opt, record.batch.max) == (1, BATCH, BATCH)
    assert (record.classes.min, record.classes.opt, record.classes.max) == (1, 2, 8)
    assert record.profiles["decoder"]["fpn0"].max == [BATCH, HIDDEN, 16, 16]
    assert record.source == str(onnx_engine) and record.compute_capability
    assert (built / "tokenizer" / "tokenizer.json").is_file()
    assert not built.with_name(built.name + ".partial").exists()
    # The plan carries the profile the record names (the stand-in stores it in the plan).
    header = json.loads((built / "decoder.plan").read_bytes()[len(_MAGIC) :].split(b"\n", 1)[0])
    assert header["profile"]["text_features"] == [[1, 32, HIDDEN], [2, 32, HIDDEN], [8, 32, HIDDEN]]
    assert header["fp16"] is True


def test_backend_matches_onnxruntime(onnx_engine: Path, built: Path, cuda_rt: Counting) -> None:
    reference = OnnxRuntimeBackend(onnx_engine)
    backend = open_backend("tensorrt", built, device="cuda:0")
    assert isinstance(backend, Backend) and isinstance(backend, TensorRTBackend)
    text = backend.encode_text(PROMPTS)
    want_text = reference.encode_text(PROMPTS)
    np.testing.assert_array_equal(text.features, want_text.features)
    np.testing.assert_array_equal(text.mask, want_text.mask)
    allocations = cuda_rt.calls["cudaMalloc"]
    kept_some = False
    # Full batch, then partial ones in the same buffers, then full again; text switching between calls.
    for seed, batch in enumerate([BATCH, 2, 1, 3, BATCH]):
        frames = frames_for(batch, seed)
        prompts = PROMPTS if seed % 2 == 0 else ["dog", "person"]
        text, want_text = backend.encode_text(prompts), reference.encode_text(prompts)
        got, want = backend.infer(frames, text, 0.5), reference.infer(frames, want_text, 0.5)
        assert_same_outputs(got, want)
        kept_some |= 0 < len(got.masks) < got.scores.size
        assert set(backend.last_timings) == {"vision", "decoder"}
        assert all(v >= 0 for v in backend.last_timings.values())
    assert kept_some, "the frames should keep some masks and drop others"
    assert cuda_rt.calls["cudaMalloc"] == allocations, "no allocation after the backend is open"
    # Threshold 0 keeps every mask (one copy); above 1 keeps none.
    frames = frames_for(BATCH, 9)
    text = backend.encode_text(PROMPTS)
    everything = backend.infer(frames, text, 0.0)
    assert_same_outputs(everything, reference.infer(frames, reference.encode_text(PROMPTS), 0.0))
    assert everything.masks.shape == (BATCH * len(PROMPTS) * QUERIES, 16, 16)
    nothing = backend.infer(frames, text, 1.5)
    assert nothing.masks.shape == (0, 16, 16) and nothing.mask_index.shape == (0, 3)
    backend.close()
    backend.close()  # idempotent
    calls = cuda_rt.calls
    assert calls["cudaMalloc"] == calls["cudaFree"] > 0
    assert calls["cudaMallocHost"] == calls["cudaFreeHost"] == 1
    assert calls["cudaEventCreate"] == calls["cudaEventDestroy"] == 3
    assert calls["cudaStreamCreateWithFlags"] == calls["cudaStreamDestroy"] == 1


def test_device_buffers_are_chained(built: Path, cuda_rt: Counting, monkeypatch: pytest.MonkeyPatch) -> None:
    trt = trt_runtime.load_tensorrt()
    with TensorRTBackend(built) as backend:
        text = backend.encode_text(PROMPTS)
        start = len(trt.executed)
        backend.infer(frames_for(2, 0), text, 0.5)
        runs = trt.executed[start:]
    assert [feeds for feeds, _ in runs] == [
        ["frames"],
        ["box_labels", "boxes", "fpn2"],
        ["fpn0", "fpn1", "fpn2", "geo_features", "geo_mask", "text_features", "text_mask"],
    ]
    vision, geometry, decoder = (addresses for _, addresses in runs)
    for name in ("fpn0", "fpn1", "fpn2"):
        assert decoder[name] == vision[name]
    assert geometry["fpn2"] == vision["fpn2"]
    assert decoder["geo_features"] == geometry["geo_features"]
    assert decoder["geo_mask"] == geometry["geo_mask"]
    assert decoder["boxes"] != geometry["boxes"]
    # Between vision and the decoder nothing came back to the host: only the outputs and kept masks did.
    assert cuda_rt.calls["cudaMemcpyAsync"] > 0


def test_contexts_share_one_scratch_block_the_size_of_the_largest_need(
    built: Path, cuda_rt: Counting
) -> None:
    """The four contexts run one after another on one stream: one block, the largest plan's need,
    lent to each, instead of four (the sum); freed on close."""
    mallocs: list[int] = []
    real_malloc = cuda_rt.cudaMalloc

    def recording_malloc(nbytes: int) -> Any:
        mallocs.append(nbytes)
        return real_malloc(nbytes)

    cuda_rt.cudaMalloc = recording_malloc  # type: ignore[method-assign]
    backend = TensorRTBackend(built)
    contexts = backend._contexts
    needs = {name: context.engine.device_memory_size_v2 for name, context in contexts.items()}
    assert len(set(needs.values())) > 1, "the stand-in plans should need different amounts"
    lent = {context.scratch for context in contexts.values()}
    assert len(lent) == 1 and None not in lent
    ((_address, size),) = lent
    assert size == max(needs.values())
    assert mallocs.count(size) == 1
    backend.infer(frames_for(2, 0), backend.encode_text(PROMPTS), 0.5)  # each context ran on it
    frees_before = cuda_rt.calls["cudaFree"]
    backend.close()
    assert cuda_rt.calls["cudaFree"] == frees_before + len(mallocs)


def test_too_many_prompts_or_frames(built: Path, cuda_rt: Counting) -> None:
    with TensorRTBackend(built) as backend:
        assert backend.max_classes == 8
        with pytest.raises(
            EngineMismatchError, match=r"9 prompts, .* take 1\.\.8 classes; rebuild with .*--max-classes 9"
        ):
            backend.encode_text([f"thing {i}" for i in range(9)])
        text = backend.encode_text(PROMPTS)
        with pytest.raises(EngineMismatchError, match=r"the engines take 1\.\.4"):
            backend.infer(frames_for(BATCH + 1, 0), text, 0.5)
        with pytest.raises(InputError, match="frames must be uint8"):
            backend.infer(frames_for(1, 0).astype(np.float32), text, 0.5)  # type: ignore[arg-type]


def test_plan_from_another_tensorrt_version(
    built: Path, cuda_rt: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_tensorrt(monkeypatch, fake_tensorrt(cuda_rt, version="10.15.0.1"))
    with pytest.raises(EngineMismatchError) as info:
        TensorRTBackend(built)
    message = str(info.value)
    assert "TensorRT 10.15.0.1 cannot load" in message and "built by TensorRT 10.14.1.48" in message
    assert "rebuild with `sam3stream build" in message
    assert cuda_rt.calls["cudaMalloc"] == cuda_rt.calls["cudaFree"]


def test_mixed_directory_is_caught(built: Path, cuda_rt: Counting) -> None:
    record = read_build_record(built)
    profiles = {**record.profiles}
    frames = profiles["vision"]["frames"]
    profiles["vision"] = {"frames": type(frames)(frames.min, frames.opt, [2, RES, RES, 3])}
    import msgspec

    write_build_record(built, msgspec.structs.replace(record, profiles=profiles))
    with pytest.raises(EngineMismatchError, match="vision plan was built for other shapes"):
        TensorRTBackend(built)


def test_a_plan_with_a_host_tensor_is_refused(built: Path, cuda_rt: Counting) -> None:
    trt_runtime.load_tensorrt().on_host.add("box_labels")
    with pytest.raises(
        EngineMismatchError, match=r"geometry.plan has tensors TensorRT keeps on the host \(box_labels\)"
    ):
        TensorRTBackend(built)


def test_onnx_directory_and_device_errors(
    onnx_engine: Path, built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EngineMismatchError, match="holds ONNX graphs, not TensorRT plans: build them with"):
        TensorRTBackend(onnx_engine)
    with pytest.raises(BackendUnavailableError, match="not on 'cpu'"):
        TensorRTBackend(built, device="cpu")
    with pytest.raises(
        BackendUnavailableError, match=r"cuda:3 was asked for but this machine has 1 CUDA device"
    ):
        TensorRTBackend(built, device="cuda:3")
    monkeypatch.setattr(trt_runtime, "load_cudart", lambda: FakeCudart(devices=0))
    with pytest.raises(BackendUnavailableError, match=r"no CUDA device is usable here .*cudaErrorNoDevice"):
        TensorRTBackend(built)


class _NoDriver(FakeCudart):
    """cuda-python 12.6 raises when libcuda cannot be loaded; later releases return an error."""

    def cudaGetDeviceCount(self) -> tuple[Any, ...]:
        raise RuntimeError("Failed to dlopen libcuda.so.1")


class _OldDriver(FakeCudart):
    def cudaGetDeviceCount(self) -> tuple[Any, ...]:
        return (self.cudaError_t.cudaErrorInsufficientDriver, None)


def test_a_missing_or_old_driver_is_named(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_runtime, "load_cudart", _NoDriver)
    with pytest.raises(BackendUnavailableError, match=r"CUDA driver could not be loaded \(Failed to dlopen"):
        TensorRTBackend(built)
    # cuda-python 13 gives the same error for a driver that is too old and for none at all.
    monkeypatch.setattr(trt_runtime, "load_cudart", _OldDriver)
    monkeypatch.setattr(trt_runtime, "driver_loads", lambda: True)
    with pytest.raises(
        BackendUnavailableError, match=r"cudaErrorInsufficientDriver.*driver is older.*tensorrt-cu12"
    ):
        TensorRTBackend(built)
    monkeypatch.setattr(trt_runtime, "driver_loads", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"no NVIDIA driver is installed here") as info:
        TensorRTBackend(built)
    assert "older" not in str(info.value)


def test_a_stream_object_becomes_the_int_handle_tensorrt_takes() -> None:
    class Stream:  # what cuda-python returns: an object that converts to its address
        def __int__(self) -> int:
            return 0x7F00

    assert trt_runtime.native_handle(Stream()) == 0x7F00
    assert trt_runtime.native_handle(42) == 42


def test_close_makes_the_device_current_and_a_failed_batch_leaves_nothing_in_flight(
    built: Path, cuda_rt: Counting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close may run on another thread than the one that opened the backend; and a batch that
    fails after its upload was queued waits for it before the pinned frames can be rewritten."""
    backend = TensorRTBackend(built)
    text = backend.encode_text(PROMPTS)

    def broken(graph: str) -> None:
        raise trt_runtime.CudaError("execute_async_v3 failed")

    monkeypatch.setattr(backend, "_run", broken)
    cuda_rt.order.clear()
    with pytest.raises(trt_runtime.CudaError):
        backend.infer(frames_for(2, 0), text, 0.5)
    assert cuda_rt.order.index("cudaMemcpyAsync") < cuda_rt.order.index("cudaStreamSynchronize")
    cuda_rt.order.clear()
    backend.close()
    assert cuda_rt.order[0] == "cudaSetDevice" and "cudaFree" in cuda_rt.order


def test_build_refuses_bad_arguments(
    onnx_engine: Path, host_cuda: Counting, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_tensorrt(monkeypatch, fake_tensorrt(host_cuda))
    with pytest.raises(InputError, match="classes: need 1 <= min <= opt <= max"):
        build_engine_dir(onnx_engine, tmp_path / "a", max_classes=2, opt_classes=3)
    with pytest.raises(InputError, match="another directory than the ONNX one"):
        build_engine_dir(onnx_engine, onnx_engine)
    (tmp_path / "notes").mkdir()
    with pytest.raises(InputError, match="exists and is not an engine directory"):
        build_engine_dir(onnx_engine, tmp_path / "notes")
    use_tensorrt(monkeypatch, fake_tensorrt(host_cuda, version="11.0.0", fp16_flag=False))
    with pytest.raises(BackendUnavailableError, match=r"no FP16 builder flag .* build with --fp32"):
        build_engine_dir(onnx_engine, tmp_path / "b")
    out = build_engine_dir(onnx_engine, tmp_path / "b", precision="fp32")
    assert read_manifest(out).precision == "fp32"
    with pytest.raises(EngineMismatchError, match="build from an ONNX engine directory"):
        build_engine_dir(out, tmp_path / "c")


def test_build_command(
    onnx_engine: Path,
    host_cuda: Counting,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    use_tensorrt(monkeypatch, fake_tensorrt(host_cuda))
    out = tmp_path / "plans"
    code = main(
        ["build", str(onnx_engine), "--out", str(out), "--fp32", "--max-classes", "6", "--workspace-gb", "2"]
    )
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    for step, graph in enumerate(["vision", "geometry", "decoder", "text"], 1):
        assert any(line.startswith(f"[{step}/4] {graph}: building a fp32 plan") for line in lines)
        assert any(
            line.startswith(f"[{step}/4] {graph}: {graph}.plan (") and " built in " in line for line in lines
        )
    assert f"TensorRT engines written to {out}" in captured.out
    record = read_build_record(out)
    assert record.precision == "fp32" and record.classes.max == 6 and record.workspace_bytes == 2 << 30
    # Building again over an engine directory replaces it.
    assert main(["build", str(onnx_engine), "--out", str(out), "--max-classes", "3"]) == 0
    assert read_build_record(out).classes.max == 3 and read_manifest(out).precision == "fp16"
    # Default output directory: next to the ONNX one.
    assert main(["build", str(onnx_engine), "--fp32"]) == 0
    assert (onnx_engine.parent / f"{onnx_engine.name}_trt_fp32" / BUILD_RECORD_NAME).is_file()


# --------------------------------------------------------------------------- without TensorRT


def test_without_tensorrt_the_errors_say_how_to_install(
    onnx_engine: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails
    pin = r"pip install 'tensorrt-cu12>=10.14,<11' 'cuda-python>=12.6,<13' for a CUDA 12 driver"
    with pytest.raises(BackendUnavailableError, match=r"TensorRT, which is not installed here .*" + pin):
        open_backend("tensorrt", tmp_path, device="cuda")
    assert main(["build", str(onnx_engine), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the tensorrt backend needs TensorRT, which is not installed here")
    assert "pip install 'tensorrt-cu12>=10.14,<11'" in err and "NVIDIA GPU" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_old_tensorrt_or_no_cuda_python(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    old = types.ModuleType("tensorrt")
    old.__version__ = "8.6.1"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 8\.6\.1 is too old"):
        TensorRTBackend(tmp_path)
    old.__version__ = "10.0.1.6"  # type: ignore[attr-defined]  # lacks device_memory_size_v2
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 10\.0\.1\.6 is too old.*10\.1\+ API"):
        TensorRTBackend(tmp_path)
    use_tensorrt(monkeypatch, fake_tensorrt(FakeCudart()))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match=r"needs cuda-python .*pip install cuda-python"):
        TensorRTBackend(tmp_path)


# ------------------------------------------------------------------------- real TensorRT (skipped without it)


def _real_tensorrt() -> Any:
    trt = pytest.importorskip("tensorrt")
    if _real_cudart() is None:
        pytest.skip("needs cuda-python and a CUDA device")
    return trt


def _by_query(out: RawOutputs) -> Callable[[int, int], dict[int, int]]:
    """Per (frame, class): query index -> row in top-K (TensorRT may order near-ties differently)."""

    def rows(b: int, c: int) -> dict[int, int]:
        return {int(q): k for k, q in enumerate(out.query_index[b, c])}

    return rows


def assert_close(got: RawOutputs, want: RawOutputs, atol: float, mask_atol: float) -> None:
    np.testing.assert_allclose(got.presence, want.presence, atol=atol)
    np.testing.assert_allclose(np.sort(got.scores, -1), np.sort(want.scores, -1), atol=atol)
    got_rows, want_rows = _by_query(got), _by_query(want)
    got_masks = {tuple(i): m for i, m in zip(got.mask_index.tolist(), got.masks, strict=True)}
    want_masks = {tuple(i): m for i, m in zip(want.mask_index.tolist(), want.masks, strict=True)}
    matched = 0
    for b in range(want.batch):
        for c in range(want.scores.shape[1]):
            g, w = got_rows(b, c), want_rows(b, c)
            for q in set(g) & set(w):
                np.testing.assert_allclose(got.boxes[b, c, g[q]], want.boxes[b, c, w[q]], atol=atol)
                if (b, c, g[q]) in got_masks and (b, c, w[q]) in want_masks:
                    np.testing.assert_allclose(
                        got_masks[(b, c, g[q])], want_masks[(b, c, w[q])], atol=mask_atol
                    )
                    matched += 1
    assert matched > 0


@pytest.mark.tensorrt
def test_real_tensorrt_synthetic_graphs(onnx_engine: Path, tmp_path: Path) -> None:
    _real_tensorrt()
    out = build_engine_dir(onnx_engine, tmp_path / "trt", precision="fp32", max_classes=8)
    reference = OnnxRuntimeBackend(onnx_engine)
    with TensorRTBackend(out) as backend:
        text = backend.encode_text(PROMPTS)
        np.testing.assert_allclose(text.features, reference.encode_text(PROMPTS).features, atol=1e-5)
        for batch in (BATCH, 1, 3):
            frames = frames_for(batch, batch)
            got = backend.infer(frames, text, 0.0)
            want = reference.infer(frames, reference.encode_text(PROMPTS), 0.0)
            np.testing.assert_allclose(got.scores, want.scores, atol=2e-3)
            np.testing.assert_allclose(got.masks, want.masks, atol=2e-3)
            assert np.abs(got.query_index - want.query_index).max() <= 1  # a cast of score x 1000


@pytest.mark.tensorrt
@pytest.mark.slow
@pytest.mark.parametrize(("precision", "atol", "mask_atol"), [("fp32", 2e-2, 5e-2), ("fp16", 5e-2, 0.25)])
def test_real_tensorrt_tiny_sam3(tmp_path: Path, precision: str, atol: float, mask_atol: float) -> None:
    _real_tensorrt()
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from sam3stream.model.export import export_engines

    onnx_dir = export_engines(
        random="tiny", resolution=490, batch=4, queries=20, out=tmp_path / "b4_q20_r490"
    )
    out = build_engine_dir(onnx_dir, precision=precision, max_classes=4)
    reference = OnnxRuntimeBackend(onnx_dir)
    prompts = ["person", "hand", "blow gun"]
    with TensorRTBackend(out) as backend:
        text = backend.encode_text(prompts)
        want_text = reference.encode_text(prompts)
        np.testing.assert_allclose(text.features, want_text.features, atol=atol)
        rng = np.random.default_rng(0)
        for batch in (4, 2):
            frames = rng.integers(0, 256, (batch, 490, 490, 3), dtype=np.uint8)
            assert_close(
                backend.infer(frames, text, 0.0), reference.infer(frames, want_text, 0.0), atol, mask_atol
            )
