"""What a TensorRT build and run need to know, worked out from the manifest alone.

Nothing here imports TensorRT or CUDA, so all of it is unit-tested on any machine:

- the optimization profile of every graph input (batch ``1 / opt / max``, classes ``1 / opt / max``,
  the FPN maps from the resolution: fpn0 ``[B, D, 4g, 4g]``, fpn1 ``[B, D, 2g, 2g]``,
  fpn2 ``[B, D, g, g]`` with ``g = R / 14``);
- the device buffers of a run and which graph inputs are another graph's outputs
  (vision -> geometry -> decoder share buffers, nothing crosses to the host in between);
- TensorRT data types as numpy dtypes, output shapes for a given (B, C), the byte runs in which
  the kept masks are copied back;
- the manifest of a built engine directory plus its build record (``tensorrt.json``: the profiles,
  the TensorRT version and GPU that built the plans), and the checks that a TensorRT engine
  directory fits the configuration, each failing with an :class:`EngineMismatchError` that says
  what to do.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from sam3stream.errors import BackendUnavailableError, EngineMismatchError
from sam3stream.resolution import PATCH
from sam3stream.runtime.manifest import GRAPH_NAMES, EngineManifest, GraphSpec

__all__ = [
    "BATCH_AXIS",
    "BUILD_RECORD_NAME",
    "CLASS_AXIS",
    "DEFAULT_MAX_CLASSES",
    "DEFAULT_OPT_CLASSES",
    "ENGINE_KIND",
    "HOST_INPUTS",
    "PIPELINE",
    "PRECISIONS",
    "AxisRange",
    "BufferSpec",
    "BuildRecord",
    "ProfileShape",
    "buffer_plan",
    "build_manifest",
    "check_bindings",
    "check_build_record",
    "check_fpn_specs",
    "check_plan_profiles",
    "check_tensorrt_engine",
    "default_build_dir",
    "file_sha256",
    "fpn_shapes",
    "graph_profiles",
    "mask_runs",
    "numpy_dtype",
    "output_shapes",
    "parse_cuda_device",
    "plan_axes",
    "read_build_record",
    "require_tensorrt_dir",
    "resolve_shape",
    "total_bytes",
    "write_build_record",
]

ENGINE_KIND = "tensorrt"
PLAN_SUFFIX = ".plan"
BUILD_RECORD_NAME = "tensorrt.json"
RECORD_FORMAT = 1
PRECISIONS = ("fp16", "fp32")
BATCH_AXIS = "batch"
CLASS_AXIS = "classes"
DEFAULT_MAX_CLASSES = 16
DEFAULT_OPT_CLASSES = 4
# The graphs of one infer() call, in the order they run; an input of a later graph that has the
# name of an earlier graph's output reads that output's device buffer.
PIPELINE = ("vision", "geometry", "decoder")
# Inputs filled from the host: frames per call, the padding box once, the text features per prompt set.
HOST_INPUTS = frozenset(
    {
        ("vision", "frames"),
        ("geometry", "boxes"),
        ("geometry", "box_labels"),
        ("decoder", "text_features"),
        ("decoder", "text_mask"),
        ("text", "input_ids"),
        ("text", "attention_mask"),
    }
)
FPN_LEVELS = {"fpn0": 4, "fpn1": 2, "fpn2": 1}  # side = level x grid

# TensorRT DataType member names -> numpy dtype names. BF16 and the quantized types have no numpy
# dtype; the exported graphs use none of them at their inputs or outputs.
_TRT_TO_NUMPY = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


# --------------------------------------------------------------------------- records


class AxisRange(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One dynamic axis of the profiles: the smallest, the tuned-for and the largest size."""

    min: int
    opt: int
    max: int

    def validate(self, what: str) -> AxisRange:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"{what}: need 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        return self


class ProfileShape(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An input's shape range in an optimization profile."""

    min: list[int]
    opt: list[int]
    max: list[int]

    def describe(self) -> str:
        return f"min {self.min} opt {self.opt} max {self.max}"


class BuildRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``tensorrt.json``: how the plans of a TensorRT engine directory were built.

    It sits beside ``manifest.json`` (whose schema is shared with the ONNX directories) and holds
    what only TensorRT cares about: plans load only into the TensorRT version that built them,
    on GPUs of the architecture they were built on, for the shapes of their profiles.
    """

    tensorrt_version: str
    precision: str  # fp16 | fp32
    batch: AxisRange
    classes: AxisRange
    profiles: dict[str, dict[str, ProfileShape]]  # graph -> input -> shape range
    source: str  # the ONNX engine directory the plans were built from
    source_created: str  # its manifest's creation time
    built: str
    workspace_bytes: int = 0  # 0: TensorRT's default (the device's memory)
    device: str = ""  # GPU name
    compute_capability: str = ""  # e.g. "9.0"
    build_seconds: dict[str, float] = {}
    format: int = RECORD_FORMAT


def read_build_record(engine_dir: Path) -> BuildRecord:
    path = Path(engine_dir) / BUILD_RECORD_NAME
    if not path.is_file():
        raise EngineMismatchError(
            f"{engine_dir} has no {BUILD_RECORD_NAME}: it was not made by `sam3stream build`; build it again"
        )
    try:
        record = msgspec.json.decode(path.read_bytes(), type=BuildRecord)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EngineMismatchError(f"{path}: invalid build record ({exc}); build the engines again") from None
    if record.format != RECORD_FORMAT:
        raise EngineMismatchError(
            f"{path}: build record format {record.format}, this sam3stream reads {RECORD_FORMAT}; "
            "build the engines again"
        )
    return record


def write_build_record(engine_dir: Path, record: BuildRecord) -> Path:
    path = Path(engine_dir) / BUILD_RECORD_NAME
    path.write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")
    return path


# --------------------------------------------------------------------------- shapes and profiles


def fpn_shapes(resolution: int, hidden: int, batch: int) -> dict[str, tuple[int, int, int, int]]:
    """The vision encoder's three maps at ``resolution``: 1008 -> 288, 144 and 72 a side."""
    if resolution % PATCH:
        raise ValueError(f"resolution {resolution} is not a multiple of {PATCH}")
    grid = resolution // PATCH
    return {name: (batch, hidden, level * grid, level * grid) for name, level in FPN_LEVELS.items()}


def plan_axes(
    manifest: EngineManifest,
    *,
    max_classes: int = DEFAULT_MAX_CLASSES,
    opt_classes: int | None = None,
    opt_batch: int | None = None,
) -> dict[str, AxisRange]:
    """The dynamic axes: batch 1 / opt (default the engine batch) / engine batch, classes 1 / opt / max."""
    if max_classes < 1:
        raise ValueError(f"max classes must be >= 1, got {max_classes}")
    batch = AxisRange(1, manifest.batch if opt_batch is None else opt_batch, manifest.batch)
    opt_c = min(DEFAULT_OPT_CLASSES, max_classes) if opt_classes is None else opt_classes
    classes = AxisRange(1, opt_c, max_classes)
    return {BATCH_AXIS: batch.validate("batch"), CLASS_AXIS: classes.validate("classes")}


def resolve_shape(
    shape: Sequence[int | str], sizes: Mapping[str, int], where: str = "tensor"
) -> tuple[int, ...]:
    """A manifest shape with its symbolic axes (``"batch"``, ``"classes"``) replaced by sizes."""
    out = []
    for dim in shape:
        if isinstance(dim, str):
            if dim not in sizes:
                raise EngineMismatchError(
                    f"{where} has a dynamic axis {dim!r}; TensorRT builds know only "
                    f"{', '.join(repr(k) for k in sizes)}: export the ONNX graphs again"
                )
            out.append(int(sizes[dim]))
        else:
            out.append(int(dim))
    return tuple(out)


def check_fpn_specs(manifest: EngineManifest) -> None:
    """The FPN tensors in the manifest must have the shapes the resolution gives."""
    want = fpn_shapes(manifest.resolution, manifest.model.hidden_size, 1)
    for graph_name, graph in manifest.graphs.items():
        for spec in [*graph.inputs, *graph.outputs]:
            if spec.name not in want:
                continue
            got = tuple(spec.shape[1:])
            if got != want[spec.name][1:]:
                raise EngineMismatchError(
                    f"{graph_name} graph: {spec.name} is [{', '.join(map(str, spec.shape))}] but resolution "
                    f"{manifest.resolution} with width {manifest.model.hidden_size} gives "
                    f"[batch, {', '.join(map(str, want[spec.name][1:]))}]: "
                    "the manifest does not match its graphs"
                )


def graph_profiles(
    manifest: EngineManifest, axes: Mapping[str, AxisRange]
) -> dict[str, dict[str, ProfileShape]]:
    """The optimization profile of every input of every graph: one profile per graph."""
    check_fpn_specs(manifest)
    low = {name: r.min for name, r in axes.items()}
    opt = {name: r.opt for name, r in axes.items()}
    high = {name: r.max for name, r in axes.items()}
    profiles: dict[str, dict[str, ProfileShape]] = {}
    for graph_name in GRAPH_NAMES:
        graph = manifest.graphs[graph_name]
        profiles[graph_name] = {
            spec.name: ProfileShape(
                min=list(resolve_shape(spec.shape, low, f"{graph_name} input {spec.name}")),
                opt=list(resolve_shape(spec.shape, opt, f"{graph_name} input {spec.name}")),
                max=list(resolve_shape(spec.shape, high, f"{graph_name} input {spec.name}")),
            )
            for spec in graph.inputs
        }
    return profiles


def output_shapes(
    manifest: EngineManifest, graph: str, batch: int, classes: int
) -> dict[str, tuple[int, ...]]:
    """Every output of ``graph`` for ``batch`` frames and ``classes`` prompts."""
    sizes = {BATCH_AXIS: batch, CLASS_AXIS: classes}
    return {
        spec.name: resolve_shape(spec.shape, sizes, f"{graph} output {spec.name}")
        for spec in manifest.graphs[graph].outputs
    }


def numpy_dtype(trt_type: str) -> np.dtype[np.generic]:
    """numpy dtype for a TensorRT ``DataType`` name (``"FLOAT"``, ``"DataType.INT64"``, ...)."""
    name = trt_type.rsplit(".", 1)[-1].upper()
    if name not in _TRT_TO_NUMPY:
        raise EngineMismatchError(
            f"TensorRT data type {trt_type} has no numpy equivalent; the sam3stream graphs use only "
            f"{', '.join(sorted(_TRT_TO_NUMPY))} at their inputs and outputs"
        )
    return np.dtype(_TRT_TO_NUMPY[name])


# --------------------------------------------------------------------------- buffers


@dataclass(frozen=True, slots=True)
class BufferSpec:
    """One device buffer, sized for the largest shapes, and the graph tensors bound to it."""

    key: str  # "graph.tensor" of the tensor that fills it
    dtype: str  # numpy dtype name
    max_shape: tuple[int, ...]
    bindings: tuple[tuple[str, str], ...]  # (graph, tensor): the producer first, then its readers
    from_host: bool  # filled by a host copy (frames, padding boxes, text)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.max_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def buffer_plan(manifest: EngineManifest, axes: Mapping[str, AxisRange]) -> list[BufferSpec]:
    """The device buffers of a backend, sized for the axes' maxima.

    An input of a pipeline graph named like an output of an earlier one is bound to that output's
    buffer (fpn0..2 from vision, geo_features and geo_mask from geometry): the decoder reads the
    vision encoder's maps where they were written. Every other input must be one of
    :data:`HOST_INPUTS`. The text graph stands alone (its features go through the host, where
    :class:`TextFeatures` keeps them).
    """
    sizes = {name: r.max for name, r in axes.items()}
    buffers: dict[str, BufferSpec] = {}
    produced: dict[str, tuple[str, GraphSpec]] = {}  # output name -> (graph, spec) of the latest producer
    for graph_name in (*PIPELINE, "text"):
        graph = manifest.graphs[graph_name]
        for spec in graph.inputs:
            where = f"{graph_name} input {spec.name}"
            shape = resolve_shape(spec.shape, sizes, where)
            source = produced.get(spec.name) if graph_name in PIPELINE else None
            if source is not None:
                producer, producer_spec = source
                out = next(o for o in producer_spec.outputs if o.name == spec.name)
                key = f"{producer}.{spec.name}"
                if out.dtype != spec.dtype or resolve_shape(out.shape, sizes, where) != shape:
                    raise EngineMismatchError(
                        f"{graph_name} input {spec.name} ({spec.dtype} {spec.shape}) does not match the "
                        f"{producer} output it reads ({out.dtype} {out.shape}): export the graphs again"
                    )
                old = buffers[key]
                buffers[key] = BufferSpec(
                    old.key, old.dtype, old.max_shape, (*old.bindings, (graph_name, spec.name)), old.from_host
                )
                continue
            if (graph_name, spec.name) not in HOST_INPUTS:
                raise EngineMismatchError(
                    f"{graph_name} input {spec.name} is neither filled from the host nor produced by an "
                    f"earlier graph ({' -> '.join(PIPELINE)}): this graph set is not one sam3stream exported"
                )
            key = f"{graph_name}.{spec.name}"
            buffers[key] = BufferSpec(key, spec.dtype, shape, ((graph_name, spec.name),), True)
        for spec in graph.outputs:
            key = f"{graph_name}.{spec.name}"
            shape = resolve_shape(spec.shape, sizes, f"{graph_name} output {spec.name}")
            buffers[key] = BufferSpec(key, spec.dtype, shape, ((graph_name, spec.name),), False)
            if graph_name in PIPELINE:
                produced[spec.name] = (graph_name, graph)
    return list(buffers.values())


def total_bytes(buffers: Sequence[BufferSpec]) -> int:
    return sum(b.nbytes for b in buffers)


def mask_runs(index: npt.NDArray[np.int64], classes: int, queries: int) -> list[tuple[int, int, int]]:
    """Copies that bring the kept masks back: ``(first mask in the output, first row on the host, count)``.

    ``index`` is [N, 3] (b, c, k) in row-major order, as ``np.argwhere`` gives it. The decoder
    writes its masks densely for the run's (B, C), so mask (b, c, k) is number
    ``(b * C + c) * K + k``; consecutive numbers are merged into one copy (a threshold of 0 keeps
    everything in a single copy, a high one costs one small copy per detection).
    """
    if index.size == 0:
        return []
    flat = (index[:, 0] * classes + index[:, 1]) * queries + index[:, 2]
    if np.any(np.diff(flat) <= 0):
        raise ValueError("mask index must be strictly increasing in row-major order")
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(flat)]))
    return [(int(flat[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


# --------------------------------------------------------------------------- directories and manifests


def default_build_dir(source: Path, precision: str) -> Path:
    """``engines/b8_q50_r1008`` -> ``engines/b8_q50_r1008_trt_fp16``."""
    source = Path(source)
    return source.parent / f"{source.name}_trt_{precision}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(
    source: EngineManifest,
    record: BuildRecord,
    plan_sha256: Mapping[str, str],
    *,
    created: str,
) -> EngineManifest:
    """The manifest of a TensorRT engine directory: the ONNX one's model and tensors, ``.plan`` files."""
    if record.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {record.precision!r}")
    graphs = {
        name: GraphSpec(
            file=f"{name}{PLAN_SUFFIX}",
            inputs=list(graph.inputs),
            outputs=list(graph.outputs),
            sha256=plan_sha256.get(name, ""),
        )
        for name, graph in source.graphs.items()
    }
    return EngineManifest(
        resolution=source.resolution,
        batch=record.batch.max,
        queries=source.queries,
        precision=record.precision,
        model=source.model,
        graphs=graphs,
        tokenizer=source.tokenizer,
        versions={**source.versions, "tensorrt": record.tensorrt_version},
        created=created,
        engine_kind=ENGINE_KIND,
    )


# --------------------------------------------------------------------------- checks


def parse_cuda_device(device: str) -> int:
    """``"cuda"`` -> 0, ``"cuda:1"`` -> 1; anything else is an error that says what to write."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device.strip().lower())
    if match is None:
        raise BackendUnavailableError(
            f"the tensorrt backend runs on an NVIDIA GPU, not on {device!r}: "
            'set engines.device = "cuda" (or "cuda:N")'
        )
    return int(match.group(1) or 0)


def require_tensorrt_dir(manifest: EngineManifest, engine_dir: Path) -> None:
    """An ONNX directory given to the TensorRT backend gets told how to build one."""
    if manifest.engine_kind == ENGINE_KIND:
        return
    if manifest.engine_kind == "onnx":
        out = default_build_dir(engine_dir, "fp16")
        raise EngineMismatchError(
            f"{engine_dir} holds ONNX graphs, not TensorRT plans: build them with "
            f"`sam3stream build {engine_dir} --out {out}` on the GPU machine and point engines.dir at {out} "
            '(or use backend = "onnxruntime" with this directory)'
        )
    raise EngineMismatchError(
        f"{engine_dir} holds {manifest.engine_kind} engines; the tensorrt backend needs plans"
    )


def check_build_record(manifest: EngineManifest, record: BuildRecord, engine_dir: Path) -> None:
    """manifest.json and tensorrt.json must describe the same build."""
    problems = []
    if record.batch.max != manifest.batch:
        problems.append(f"manifest batch {manifest.batch} but profiles up to {record.batch.max}")
    if record.precision != manifest.precision:
        problems.append(f"manifest precision {manifest.precision} but build {record.precision}")
    missing = [g for g in GRAPH_NAMES if g not in record.profiles]
    if missing:
        problems.append(f"no profiles for {', '.join(missing)}")
    if problems:
        raise EngineMismatchError(
            f"{engine_dir}: {'; '.join(problems)}: the directory mixes two builds; build it again"
        )


def check_tensorrt_engine(
    manifest: EngineManifest,
    record: BuildRecord,
    engine_dir: Path,
    *,
    resolution: int | None = None,
    batch: int | None = None,
    classes: int | None = None,
    tensorrt_version: str | None = None,
) -> None:
    """Raise if a TensorRT engine directory cannot serve the configuration (and say what to do)."""
    require_tensorrt_dir(manifest, engine_dir)
    check_build_record(manifest, record, engine_dir)
    problems = []
    if resolution is not None and manifest.resolution != resolution:
        problems.append(
            f"resolution {manifest.resolution} (config asks for {resolution}: engines.export.resolution)"
        )
    if batch is not None and record.batch.max < batch:
        problems.append(
            f"batches of up to {record.batch.max} frames (config asks for {batch}: batching.max_batch)"
        )
    if classes is not None and record.classes.max < classes:
        problems.append(f"up to {record.classes.max} classes (config has {classes}: prompts.classes)")
    if problems:
        raise EngineMismatchError(
            f"TensorRT engine directory {engine_dir} was built for "
            + ", ".join(problems)
            + "; build a matching one from an ONNX directory of that resolution and batch "
            "(`sam3stream export ... --out ONNX_DIR`, then `sam3stream build ONNX_DIR --max-classes N`) "
            "or change the config"
        )
    if tensorrt_version is not None and tensorrt_version != record.tensorrt_version:
        raise EngineMismatchError(
            f"{engine_dir} was built by TensorRT {record.tensorrt_version} and this is TensorRT "
            f"{tensorrt_version}: plans load only into the version that built them; rebuild with "
            f"`sam3stream build {record.source} --out {engine_dir}`"
        )


def check_bindings(
    graph: str,
    spec: GraphSpec,
    actual: Sequence[tuple[str, bool, str]],
    plan: Path,
) -> None:
    """The plan's I/O tensors ``(name, is_input, numpy dtype)`` must be the manifest's."""
    want = {s.name: (True, s.dtype) for s in spec.inputs} | {s.name: (False, s.dtype) for s in spec.outputs}
    got = {name: (is_input, dtype) for name, is_input, dtype in actual}
    if want == got:
        return
    lines = [
        f"{name}: manifest {_role(want.get(name))}, plan {_role(got.get(name))}"
        for name in sorted(set(want) | set(got))
        if want.get(name) != got.get(name)
    ]
    raise EngineMismatchError(
        f"{plan}: the {graph} plan's tensors differ from the manifest ({'; '.join(lines)}); "
        "build the directory again"
    )


def _role(binding: tuple[bool, str] | None) -> str:
    if binding is None:
        return "absent"
    return f"{'input' if binding[0] else 'output'} {binding[1]}"


def check_plan_profiles(
    graph: str,
    expected: Mapping[str, ProfileShape],
    actual: Mapping[str, ProfileShape],
    plan: Path,
) -> None:
    """The profile a plan carries must be the one recorded at build time (catches mixed directories)."""
    problems = []
    for name, want in expected.items():
        got = actual.get(name)
        if got != want:
            problems.append(
                f"{name}: recorded {want.describe()}, plan has {got.describe() if got else 'none'}"
            )
    if problems:
        raise EngineMismatchError(
            f"{plan}: the {graph} plan was built for other shapes than {BUILD_RECORD_NAME} records "
            f"({'; '.join(problems)}): the plans come from different builds; build the directory again"
        )
