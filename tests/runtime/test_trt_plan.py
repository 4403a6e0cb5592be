"""TensorRT planning without TensorRT: profiles, buffers, dtypes, mask copies, manifests, checks."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from sam3stream.errors import BackendUnavailableError, EngineMismatchError
from sam3stream.runtime.manifest import (
    EngineManifest,
    GraphSpec,
    ModelSpec,
    TensorSpec,
    read_manifest,
    write_manifest,
)
from sam3stream.runtime.trt_plan import (
    BATCH_AXIS,
    BUILD_RECORD_NAME,
    CLASS_AXIS,
    AxisRange,
    BuildRecord,
    ProfileShape,
    buffer_plan,
    build_manifest,
    check_bindings,
    check_build_record,
    check_plan_profiles,
    check_tensorrt_engine,
    default_build_dir,
    fpn_shapes,
    graph_profiles,
    mask_runs,
    numpy_dtype,
    output_shapes,
    parse_cuda_device,
    plan_axes,
    read_build_record,
    require_tensorrt_dir,
    resolve_shape,
    total_bytes,
    write_build_record,
)


def onnx_manifest(
    resolution: int, batch: int = 8, queries: int = 50, hidden: int = 256, fpn_from: int | None = None
) -> EngineManifest:
    """A manifest shaped like the one `sam3stream export` writes (see the tiny engine at 490)."""
    g = (fpn_from or resolution) // 14
    m = 4 * g
    fpn = {"fpn0": 4 * g, "fpn1": 2 * g, "fpn2": g}

    def t(name: str, *shape: int | str, dtype: str = "float32") -> TensorSpec:
        return TensorSpec(name, list(shape), dtype)

    maps = [t(name, "batch", hidden, side, side) for name, side in fpn.items()]
    graphs = {
        "vision": GraphSpec(
            "vision.onnx", [t("frames", "batch", resolution, resolution, 3, dtype="uint8")], maps
        ),
        "geometry": GraphSpec(
            "geometry.onnx",
            [maps[2], t("boxes", "batch", 1, 4), t("box_labels", "batch", 1, dtype="int64")],
            [t("geo_features", "batch", 2, hidden), t("geo_mask", "batch", 2, dtype="bool")],
        ),
        "text": GraphSpec(
            "text.onnx",
            [t("input_ids", "classes", 32, dtype="int64"), t("attention_mask", "classes", 32, dtype="int64")],
            [t("text_features", "classes", 32, hidden)],
        ),
        "decoder": GraphSpec(
            "decoder.onnx",
            [
                *maps,
                t("text_features", "classes", 32, hidden),
                t("text_mask", "classes", 32, dtype="bool"),
                t("geo_features", "batch", 2, hidden),
                t("geo_mask", "batch", 2, dtype="bool"),
            ],
            [
                t("scores", "batch", "classes", queries),
                t("boxes", "batch", "classes", queries, 4),
                t("masks", "batch", "classes", queries, m, m),
                t("presence", "batch", "classes"),
                t("query_index", "batch", "classes", queries, dtype="int64"),
            ],
        ),
    }
    return EngineManifest(
        resolution=resolution,
        batch=batch,
        queries=queries,
        precision="float32",
        model=ModelSpec("random:tiny:seed=0", "ab" * 32, hidden, 32, 200),
        graphs=graphs,
        tokenizer="tokenizer",
        versions={"sam3stream": "0.1.0", "torch": "2.13.0"},
        created="2026-01-01T00:00:00+00:00",
    )


def record_for(manifest: EngineManifest, **changes: object) -> BuildRecord:
    axes = plan_axes(manifest, max_classes=16)
    record = BuildRecord(
        tensorrt_version="10.14.1.48",
        precision="fp16",
        batch=axes[BATCH_AXIS],
        classes=axes[CLASS_AXIS],
        profiles=graph_profiles(manifest, axes),
        source="engines/b8_q50_r1008",
        source_created=manifest.created,
        built="2026-01-02T00:00:00+00:00",
        device="NVIDIA H200",
        compute_capability="9.0",
    )
    return msgspec.structs.replace(record, **changes)


# --------------------------------------------------------------------------- shapes and profiles


@pytest.mark.parametrize(("resolution", "grid"), [(1008, 72), (672, 48), (560, 40)])
def test_fpn_shapes_follow_the_resolution(resolution: int, grid: int) -> None:
    shapes = fpn_shapes(resolution, 256, 8)
    assert shapes == {
        "fpn0": (8, 256, 4 * grid, 4 * grid),
        "fpn1": (8, 256, 2 * grid, 2 * grid),
        "fpn2": (8, 256, grid, grid),
    }
    with pytest.raises(ValueError, match="multiple of 14"):
        fpn_shapes(resolution + 1, 256, 1)


@pytest.mark.parametrize(("resolution", "grid"), [(1008, 72), (672, 48), (560, 40)])
def test_profiles_per_graph(resolution: int, grid: int) -> None:
    manifest = onnx_manifest(resolution)
    profiles = graph_profiles(manifest, plan_axes(manifest, max_classes=16))
    assert set(profiles) == {"vision", "text", "geometry", "decoder"}
    r = resolution
    assert profiles["vision"] == {"frames": ProfileShape([1, r, r, 3], [8, r, r, 3], [8, r, r, 3])}
    decoder = profiles["decoder"]
    assert decoder["fpn0"] == ProfileShape(
        [1, 256, 4 * grid, 4 * grid], [8, 256, 4 * grid, 4 * grid], [8, 256, 4 * grid, 4 * grid]
    )
    assert decoder["fpn1"].max == [8, 256, 2 * grid, 2 * grid]
    assert decoder["fpn2"].min == [1, 256, grid, grid]
    assert decoder["text_features"] == ProfileShape([1, 32, 256], [4, 32, 256], [16, 32, 256])
    assert decoder["text_mask"] == ProfileShape([1, 32], [4, 32], [16, 32])
    assert decoder["geo_mask"] == ProfileShape([1, 2], [8, 2], [8, 2])
    assert profiles["geometry"]["box_labels"] == ProfileShape([1, 1], [8, 1], [8, 1])
    assert profiles["text"]["input_ids"] == ProfileShape([1, 32], [4, 32], [16, 32])
    assert set(decoder) == {"fpn0", "fpn1", "fpn2", "text_features", "text_mask", "geo_features", "geo_mask"}


def test_axes_defaults_and_options() -> None:
    manifest = onnx_manifest(1008, batch=8)
    axes = plan_axes(manifest)
    assert axes[BATCH_AXIS] == AxisRange(1, 8, 8)
    assert axes[CLASS_AXIS] == AxisRange(1, 4, 16)
    assert plan_axes(manifest, max_classes=2)[CLASS_AXIS] == AxisRange(1, 2, 2)
    axes = plan_axes(manifest, max_classes=32, opt_classes=10, opt_batch=4)
    assert (axes[BATCH_AXIS], axes[CLASS_AXIS]) == (AxisRange(1, 4, 8), AxisRange(1, 10, 32))
    with pytest.raises(ValueError, match="max classes"):
        plan_axes(manifest, max_classes=0)
    with pytest.raises(ValueError, match="classes: need 1 <= min <= opt <= max"):
        plan_axes(manifest, max_classes=4, opt_classes=5)
    with pytest.raises(ValueError, match="batch"):
        plan_axes(manifest, opt_batch=9)
    one = onnx_manifest(560, batch=1)
    assert plan_axes(one)[BATCH_AXIS] == AxisRange(1, 1, 1)


def test_manifest_fpn_shapes_must_match_the_resolution() -> None:
    manifest = onnx_manifest(1008, fpn_from=672)  # graphs of 672 under a 1008 manifest
    with pytest.raises(EngineMismatchError, match=r"fpn0 is \[batch, 256, 192, 192\] but resolution 1008"):
        graph_profiles(manifest, plan_axes(manifest))


def test_unknown_dynamic_axis_is_named() -> None:
    assert resolve_shape(["batch", 3, "classes"], {"batch": 2, "classes": 5}) == (2, 3, 5)
    with pytest.raises(EngineMismatchError, match="decoder input x has a dynamic axis 's77'"):
        resolve_shape(["s77", 4], {"batch": 2}, "decoder input x")


def test_output_shapes_for_a_batch_and_classes() -> None:
    manifest = onnx_manifest(1008, queries=50)
    shapes = output_shapes(manifest, "decoder", 3, 2)
    assert shapes == {
        "scores": (3, 2, 50),
        "boxes": (3, 2, 50, 4),
        "masks": (3, 2, 50, 288, 288),
        "presence": (3, 2),
        "query_index": (3, 2, 50),
    }
    assert output_shapes(manifest, "vision", 5, 1)["fpn2"] == (5, 256, 72, 72)
    assert output_shapes(manifest, "text", 1, 7) == {"text_features": (7, 32, 256)}


def test_numpy_dtypes_from_tensorrt_names() -> None:
    assert numpy_dtype("FLOAT") == np.float32
    assert numpy_dtype("DataType.HALF") == np.float16
    assert numpy_dtype("INT64") == np.int64
    assert numpy_dtype("BOOL") == np.bool_
    assert numpy_dtype("UINT8") == np.uint8
    assert numpy_dtype("int32") == np.int32
    with pytest.raises(EngineMismatchError, match="BF16 has no numpy equivalent"):
        numpy_dtype("BF16")


# --------------------------------------------------------------------------- buffers


def test_buffer_plan_chains_vision_geometry_decoder() -> None:
    manifest = onnx_manifest(1008, batch=8, queries=50)
    buffers = {b.key: b for b in buffer_plan(manifest, plan_axes(manifest, max_classes=16))}
    # The FPN maps are written by vision and read in place by geometry and the decoder.
    assert buffers["vision.fpn0"].bindings == (("vision", "fpn0"), ("decoder", "fpn0"))
    assert buffers["vision.fpn2"].bindings == (("vision", "fpn2"), ("geometry", "fpn2"), ("decoder", "fpn2"))
    assert buffers["geometry.geo_features"].bindings == (
        ("geometry", "geo_features"),
        ("decoder", "geo_features"),
    )
    assert buffers["geometry.geo_mask"].bindings == (("geometry", "geo_mask"), ("decoder", "geo_mask"))
    # Same name, different tensors: the padding boxes in, the detections out.
    assert buffers["geometry.boxes"].max_shape == (8, 1, 4) and buffers["geometry.boxes"].from_host
    assert buffers["decoder.boxes"].max_shape == (8, 16, 50, 4) and not buffers["decoder.boxes"].from_host
    # Host-filled inputs, and the text graph on its own.
    host = {k for k, b in buffers.items() if b.from_host}
    assert host == {
        "vision.frames",
        "geometry.boxes",
        "geometry.box_labels",
        "decoder.text_features",
        "decoder.text_mask",
        "text.input_ids",
        "text.attention_mask",
    }
    assert buffers["text.text_features"].bindings == (("text", "text_features"),)
    # Sized once for the largest run: 8 frames x 16 classes x 50 masks of 288 x 288 float32.
    assert buffers["decoder.masks"].nbytes == 8 * 16 * 50 * 288 * 288 * 4
    assert buffers["vision.frames"].nbytes == 8 * 1008 * 1008 * 3
    assert buffers["decoder.text_mask"].dtype == "bool"
    assert total_bytes(list(buffers.values())) == sum(b.nbytes for b in buffers.values())
    every = [binding for b in buffers.values() for binding in b.bindings]
    assert len(every) == len(set(every))  # each graph tensor bound exactly once


def test_buffer_plan_rejects_unknown_inputs_and_mismatched_links() -> None:
    manifest = onnx_manifest(560)
    decoder = manifest.graphs["decoder"]
    extra = msgspec.structs.replace(
        decoder, inputs=[*decoder.inputs, TensorSpec("prompt_boxes", ["batch", 4], "float32")]
    )
    bad = msgspec.structs.replace(manifest, graphs={**manifest.graphs, "decoder": extra})
    with pytest.raises(
        EngineMismatchError, match="decoder input prompt_boxes is neither filled from the host"
    ):
        buffer_plan(bad, plan_axes(bad))
    inputs = [
        TensorSpec("geo_mask", ["batch", 2], "float32") if s.name == "geo_mask" else s for s in decoder.inputs
    ]
    bad = msgspec.structs.replace(
        manifest, graphs={**manifest.graphs, "decoder": msgspec.structs.replace(decoder, inputs=inputs)}
    )
    with pytest.raises(
        EngineMismatchError, match=r"decoder input geo_mask .* does not match the geometry output"
    ):
        buffer_plan(bad, plan_axes(bad))


def test_mask_runs_merge_consecutive_masks() -> None:
    classes, queries = 3, 4
    scores = np.zeros((2, classes, queries), np.float32)
    keep = [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 3), (0, 2, 0), (1, 2, 3)]
    for b, c, k in keep:
        scores[b, c, k] = 1.0
    index = np.argwhere(scores >= 0.5).astype(np.int64)
    runs = mask_runs(index, classes, queries)
    # (0,1,3) is mask 7 and (0,2,0) mask 8: one copy; (1,2,3) is mask 23.
    assert runs == [(0, 0, 3), (7, 3, 2), (23, 5, 1)]
    # Copying the runs out of the dense block gives what fancy indexing gives.
    dense = np.random.default_rng(0).standard_normal((2, classes, queries, 5, 5)).astype(np.float32)
    flat = dense.reshape(-1, 5, 5)
    out = np.empty((len(index), 5, 5), np.float32)
    for first, row, count in runs:
        out[row : row + count] = flat[first : first + count]
    np.testing.assert_array_equal(out, dense[index[:, 0], index[:, 1], index[:, 2]])
    # Everything kept: one copy; nothing kept: none.
    everything = np.argwhere(np.ones((2, classes, queries))).astype(np.int64)
    assert mask_runs(everything, classes, queries) == [(0, 0, 24)]
    assert mask_runs(np.zeros((0, 3), np.int64), classes, queries) == []
    with pytest.raises(ValueError, match="increasing"):
        mask_runs(index[::-1].copy(), classes, queries)


# --------------------------------------------------------------------------- manifests and records


def _engine_dir(tmp_path: Path, manifest: EngineManifest, record: BuildRecord) -> Path:
    out = tmp_path / "b8_q50_r1008_trt_fp16"
    (out / "tokenizer").mkdir(parents=True)
    shas = {}
    for name in manifest.graphs:
        (out / f"{name}.plan").write_bytes(name.encode())
        shas[name] = f"{name}-sha"
    write_build_record(out, record)
    write_manifest(out, build_manifest(manifest, record, shas, created="2026-01-02T00:00:00+00:00"))
    return out


def test_built_manifest_round_trip(tmp_path: Path) -> None:
    source = onnx_manifest(1008)
    record = record_for(source)
    out = _engine_dir(tmp_path, source, record)
    manifest = read_manifest(out)
    assert manifest.engine_kind == "tensorrt"
    assert manifest.precision == "fp16"
    assert (manifest.resolution, manifest.batch, manifest.queries) == (1008, 8, 50)
    assert manifest.model == source.model
    assert manifest.tokenizer == source.tokenizer
    assert manifest.versions == {**source.versions, "tensorrt": "10.14.1.48"}
    assert {name: g.file for name, g in manifest.graphs.items()} == {
        "vision": "vision.plan",
        "text": "text.plan",
        "geometry": "geometry.plan",
        "decoder": "decoder.plan",
    }
    assert manifest.graphs["decoder"].sha256 == "decoder-sha"
    assert manifest.graphs["decoder"].inputs == source.graphs["decoder"].inputs
    assert manifest.graphs["decoder"].outputs == source.graphs["decoder"].outputs
    assert read_build_record(out) == record
    assert read_build_record(out).profiles["decoder"]["fpn0"].max == [8, 256, 288, 288]
    check_tensorrt_engine(
        manifest, record, out, resolution=1008, batch=8, classes=16, tensorrt_version="10.14.1.48"
    )


def test_build_record_errors(tmp_path: Path) -> None:
    with pytest.raises(
        EngineMismatchError, match=r"no tensorrt\.json: it was not made by `sam3stream build`"
    ):
        read_build_record(tmp_path)
    (tmp_path / BUILD_RECORD_NAME).write_text("{}")
    with pytest.raises(EngineMismatchError, match="invalid build record"):
        read_build_record(tmp_path)
    record = record_for(onnx_manifest(560), format=99)
    write_build_record(tmp_path, record)
    with pytest.raises(EngineMismatchError, match="format 99"):
        read_build_record(tmp_path)


def test_default_build_dir_names_the_precision() -> None:
    assert default_build_dir(Path("engines/b8_q50_r1008"), "fp16") == Path("engines/b8_q50_r1008_trt_fp16")
    assert default_build_dir(Path("b4_q20_r560/"), "fp32") == Path("b4_q20_r560_trt_fp32")


# --------------------------------------------------------------------------- checks


def test_an_onnx_directory_is_told_to_build(tmp_path: Path) -> None:
    onnx_dir = tmp_path / "b8_q50_r1008"
    with pytest.raises(EngineMismatchError) as info:
        require_tensorrt_dir(onnx_manifest(1008), onnx_dir)
    message = str(info.value)
    assert "holds ONNX graphs, not TensorRT plans" in message
    assert f"sam3stream build {onnx_dir} --out {onnx_dir}_trt_fp16" in message
    fake = msgspec.structs.replace(onnx_manifest(1008), engine_kind="fake")
    with pytest.raises(EngineMismatchError, match="holds fake engines"):
        require_tensorrt_dir(fake, onnx_dir)


def test_mismatch_messages_say_what_was_built_and_what_is_asked(tmp_path: Path) -> None:
    source = onnx_manifest(672, batch=4)
    record = record_for(source)
    out = _engine_dir(tmp_path, source, record)
    manifest = read_manifest(out)
    with pytest.raises(EngineMismatchError) as info:
        check_tensorrt_engine(manifest, record, out, resolution=1008, batch=8, classes=20)
    message = str(info.value)
    assert (
        f"TensorRT engine directory {out} was built for resolution 672 "
        "(config asks for 1008: engines.export.resolution)" in message
    )
    assert "batches of up to 4 frames (config asks for 8: batching.max_batch)" in message
    assert "up to 16 classes (config has 20: prompts.classes)" in message
    assert "sam3stream build ONNX_DIR --max-classes N" in message
    # Fits: smaller batches and fewer classes are fine.
    check_tensorrt_engine(manifest, record, out, resolution=672, batch=2, classes=3)
    with pytest.raises(
        EngineMismatchError, match=r"built by TensorRT 10\.14\.1\.48 and this is TensorRT 10\.15\.0"
    ):
        check_tensorrt_engine(manifest, record, out, tensorrt_version="10.15.0")


def test_manifest_and_record_must_be_one_build(tmp_path: Path) -> None:
    source = onnx_manifest(560, batch=4)
    record = record_for(source)
    manifest = build_manifest(source, record, {}, created="now")
    check_build_record(manifest, record, tmp_path)
    other = record_for(onnx_manifest(560, batch=8), precision="fp32")
    with pytest.raises(
        EngineMismatchError, match="manifest batch 4 but profiles up to 8; manifest precision fp16"
    ):
        check_build_record(manifest, other, tmp_path)
    missing = msgspec.structs.replace(record, profiles={"vision": record.profiles["vision"]})
    with pytest.raises(EngineMismatchError, match="no profiles for text, geometry, decoder"):
        check_build_record(manifest, missing, tmp_path)


def test_plan_bindings_and_profiles_are_checked(tmp_path: Path) -> None:
    manifest = onnx_manifest(560)
    spec = manifest.graphs["geometry"]
    good = [("fpn2", True, "float32"), ("boxes", True, "float32"), ("box_labels", True, "int64")]
    good += [("geo_features", False, "float32"), ("geo_mask", False, "bool")]
    check_bindings("geometry", spec, good, tmp_path / "geometry.plan")
    bad = [*good[:2], ("box_labels", True, "int32"), good[3]]
    with pytest.raises(EngineMismatchError) as info:
        check_bindings("geometry", spec, bad, tmp_path / "geometry.plan")
    assert "box_labels: manifest input int64, plan input int32" in str(info.value)
    assert "geo_mask: manifest output bool, plan absent" in str(info.value)

    profiles = graph_profiles(manifest, plan_axes(manifest))
    check_plan_profiles("vision", profiles["vision"], profiles["vision"], tmp_path / "vision.plan")
    other = graph_profiles(onnx_manifest(560, batch=2), plan_axes(onnx_manifest(560, batch=2)))
    with pytest.raises(
        EngineMismatchError, match=r"frames: recorded min .* max \[8, 560, 560, 3\], plan has"
    ):
        check_plan_profiles("vision", profiles["vision"], other["vision"], tmp_path / "vision.plan")


def test_cuda_device_names() -> None:
    assert parse_cuda_device("cuda") == 0
    assert parse_cuda_device("cuda:0") == 0
    assert parse_cuda_device("CUDA:3") == 3
    for bad in ("cpu", "cuda:", "cuda:x", "gpu0"):
        with pytest.raises(BackendUnavailableError, match=r'engines\.device = "cuda"'):
            parse_cuda_device(bad)
