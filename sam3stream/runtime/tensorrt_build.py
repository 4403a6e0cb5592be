"""Building TensorRT plans from an ONNX engine directory (`sam3stream build`).

Written against the TensorRT 10 Python API: one plan per graph, each with one optimization
profile whose shapes come from the manifest (runtime/trt_plan.py), FP16 allowed by default.
The output directory is written as ``<out>.partial`` and renamed at the end.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from sam3stream.errors import BackendUnavailableError, EngineMismatchError, InputError, Sam3StreamError
from sam3stream.runtime import trt_runtime
from sam3stream.runtime.manifest import MANIFEST_NAME, read_manifest, write_manifest
from sam3stream.runtime.trt_plan import (
    BATCH_AXIS,
    CLASS_AXIS,
    DEFAULT_MAX_CLASSES,
    PRECISIONS,
    BuildRecord,
    ProfileShape,
    build_manifest,
    default_build_dir,
    file_sha256,
    graph_profiles,
    plan_axes,
    write_build_record,
)

__all__ = ["BUILD_ORDER", "TensorRTBuildError", "build_engine_dir"]

log = structlog.get_logger(__name__)

BUILD_ORDER = ("vision", "geometry", "decoder", "text")


class TensorRTBuildError(Sam3StreamError):
    """TensorRT could not parse a graph or build a plan from it."""


def build_engine_dir(
    source: Path,
    out: Path | None = None,
    *,
    precision: str = "fp16",
    workspace_gb: float | None = None,
    max_classes: int = DEFAULT_MAX_CLASSES,
    opt_classes: int | None = None,
    opt_batch: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build one TensorRT plan per graph of the ONNX engine directory ``source`` into ``out``.

    ``out`` (default ``<source>_trt_<precision>``) gets the four ``.plan`` files, the tokenizer,
    a manifest with ``engine_kind = "tensorrt"`` and ``tensorrt.json`` with the profiles. It is
    written as ``<out>.partial`` and renamed at the end, so a failed build leaves nothing half made.
    """
    source = Path(source)
    manifest = read_manifest(source)
    if manifest.engine_kind != "onnx":
        raise EngineMismatchError(
            f"{source} holds {manifest.engine_kind} engines; build from an ONNX engine directory "
            "(one that `sam3stream export` made)"
        )
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if workspace_gb is not None and workspace_gb <= 0:
        raise InputError(f"--workspace-gb must be positive, got {workspace_gb}")
    try:
        axes = plan_axes(manifest, max_classes=max_classes, opt_classes=opt_classes, opt_batch=opt_batch)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    profiles = graph_profiles(manifest, axes)
    out = Path(out) if out is not None else default_build_dir(source, precision)
    if out.resolve() == source.resolve():
        raise InputError(f"--out must be another directory than the ONNX one ({source})")
    if out.exists() and not (out / MANIFEST_NAME).is_file():
        raise InputError(f"{out} exists and is not an engine directory; choose another --out")

    trt = trt_runtime.load_tensorrt()
    if precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} has no FP16 builder flag (TensorRT 11 removed weakly typed builds): "
            "build with --fp32, or install TensorRT 10.x for --fp16"
        )
    device, capability = "", ""
    try:
        cuda = trt_runtime.CudaRuntime(trt_runtime.load_cudart())
    except BackendUnavailableError:
        cuda = None  # the builder needs no cuda-python; the record then names no GPU
    if cuda is not None:
        device, capability = cuda.open_device(0)
    logger = trt_runtime.trt_logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # TensorRT raises plain exceptions when CUDA cannot start
        raise BackendUnavailableError(
            f"TensorRT could not start a builder (no usable NVIDIA GPU?): {exc}"
        ) from exc
    workspace = int(workspace_gb * (1 << 30)) if workspace_gb is not None else 0

    def say(message: str) -> None:
        log.info("tensorrt build", message=message)
        if progress is not None:
            progress(message)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    shas: dict[str, str] = {}
    try:
        for step, name in enumerate(BUILD_ORDER, 1):
            graph = manifest.graphs[name]
            shapes = ", ".join(f"{n} {p.min}..{p.max}" for n, p in profiles[name].items())
            say(
                f"[{step}/{len(BUILD_ORDER)}] {name}: building a {precision} plan from {graph.file}: {shapes}"
            )
            t0 = time.perf_counter()
            plan = _build_plan(
                trt, builder, logger, source / graph.file, profiles[name], precision, workspace
            )
            path = tmp / f"{name}.plan"
            with path.open("wb") as f:
                f.write(plan)
            seconds[name] = round(time.perf_counter() - t0, 2)
            shas[name] = file_sha256(path)
            say(
                f"[{step}/{len(BUILD_ORDER)}] {name}: {path.name} ({path.stat().st_size / 2**20:.1f} MiB) "
                f"built in {seconds[name]:.1f} s, {time.perf_counter() - started:.1f} s so far"
            )
        shutil.copytree(source / manifest.tokenizer, tmp / manifest.tokenizer)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        record = BuildRecord(
            tensorrt_version=str(trt.__version__),
            precision=precision,
            batch=axes[BATCH_AXIS],
            classes=axes[CLASS_AXIS],
            profiles=profiles,
            source=str(source),
            source_created=manifest.created,
            built=now,
            workspace_bytes=workspace,
            device=device,
            compute_capability=capability,
            build_seconds=seconds,
        )
        write_build_record(tmp, record)
        write_manifest(tmp, build_manifest(manifest, record, shas, created=now))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


def _build_plan(
    trt: Any,
    builder: Any,
    logger: Any,
    onnx_path: Path,
    profile: Mapping[str, ProfileShape],
    precision: str,
    workspace: int,
) -> Any:
    """Parse one ONNX graph and build its serialized plan (an ``IHostMemory``)."""
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        hint = ""
        if any("Attention" in e for e in errors):
            hint = "; ONNX's Attention operator (opset 23) needs TensorRT 10.14 or later"
        raise TensorRTBuildError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path}: {'; '.join(errors) or 'no details'}{hint}"
        )
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile):
        raise EngineMismatchError(
            f"{onnx_path} has inputs {sorted(names)} but its manifest lists {sorted(profile)}; "
            "export it again"
        )
    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name, shape in profile.items():
        try:  # set_shape raises RuntimeError on inconsistent shapes; it returns nothing
            opt_profile.set_shape(name, tuple(shape.min), tuple(shape.opt), tuple(shape.max))
        except RuntimeError as exc:
            raise TensorRTBuildError(
                f"TensorRT refused the profile of input {name!r} of {onnx_path} "
                f"(min {shape.min}, opt {shape.opt}, max {shape.max}): {exc}"
            ) from exc
    if config.add_optimization_profile(opt_profile) < 0:
        raise TensorRTBuildError(
            f"TensorRT refused the optimization profile for {onnx_path}: {dict(profile)}"
        )
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"TensorRT could not build a plan from {onnx_path} (see its messages above)")
    return plan
