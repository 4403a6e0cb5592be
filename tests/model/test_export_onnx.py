"""The exported ONNX graphs, run by onnxruntime, equal the torch parts; the manifest describes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3stream.errors import EngineMismatchError, InputError
from sam3stream.model.checkpoint import load_checkpoint
from sam3stream.model.parts import padding_boxes, split_model
from sam3stream.runtime.manifest import check_engine_matches, check_engine_source, read_manifest
from sam3stream.runtime.onnxruntime_backend import OnnxRuntimeBackend
from sam3stream.runtime.tokenize import PromptTokenizer

PROMPTS = ["person", "hand", "blow gun"]


def test_manifest_describes_the_graphs(tiny_engines: Path) -> None:
    manifest = read_manifest(tiny_engines)
    assert (manifest.resolution, manifest.batch, manifest.queries) == (490, 4, 20)
    assert set(manifest.graphs) == {"vision", "text", "geometry", "decoder"}
    decoder = manifest.graphs["decoder"]
    masks = next(o for o in decoder.outputs if o.name == "masks")
    assert masks.shape[2:] == [20, 140, 140]
    assert isinstance(masks.shape[0], str)  # dynamic batch axis
    assert manifest.model.checkpoint_sha256 and manifest.versions["torch"]
    assert (tiny_engines / manifest.tokenizer / "tokenizer.json").is_file()


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_torch_parts(tiny_checkpoint: Path, tiny_engines: Path, batch: int) -> None:
    backend = OnnxRuntimeBackend(tiny_engines)
    parts = split_model(load_checkpoint(tiny_checkpoint, 490).model, 20)
    rng = np.random.default_rng(batch)
    frames = rng.integers(0, 256, (batch, 490, 490, 3), dtype=np.uint8)
    text = backend.encode_text(PROMPTS)
    ids, mask = PromptTokenizer(tiny_engines / "tokenizer").encode(PROMPTS)[:2]
    raw = backend.infer(frames, text, min_score=0.0)
    with torch.no_grad():
        ref_text = parts.text(torch.from_numpy(ids), torch.from_numpy(mask))
        fpn0, fpn1, fpn2 = parts.vision(torch.from_numpy(frames))
        geo, geo_mask = parts.geometry(fpn2, *padding_boxes(batch))
        scores, boxes, masks, presence, index = parts.decoder(
            fpn0, fpn1, fpn2, ref_text, torch.from_numpy(mask).bool(), geo, geo_mask
        )
    np.testing.assert_allclose(text.features, ref_text.numpy(), atol=1e-3)
    np.testing.assert_allclose(raw.scores, scores.numpy(), atol=1e-3)
    np.testing.assert_allclose(raw.boxes, boxes.numpy(), atol=1e-3)
    np.testing.assert_allclose(raw.presence, presence.numpy(), atol=1e-3)
    # min_score 0 keeps every mask, in (b, c, k) order.
    assert raw.masks.shape == (batch * len(PROMPTS) * 20, 140, 140)
    np.testing.assert_allclose(raw.masks, masks.numpy().reshape(raw.masks.shape), atol=1e-3)
    assert raw.query_index.shape == index.shape


def test_min_score_keeps_only_masks_that_can_be_published(tiny_engines: Path) -> None:
    backend = OnnxRuntimeBackend(tiny_engines)
    frames = np.full((2, 490, 490, 3), 128, np.uint8)
    text = backend.encode_text(PROMPTS[:2])
    everything = backend.infer(frames, text, min_score=0.0)
    cut = float(np.median(everything.scores))
    some = backend.infer(frames, text, min_score=cut)
    expected = np.argwhere(everything.scores >= cut)
    assert np.array_equal(some.mask_index, expected)
    b, c, k = expected[0]
    flat = (b * 2 + c) * 20 + k
    np.testing.assert_array_equal(some.masks[0], everything.masks[flat])


def test_engine_directory_errors(tiny_engines: Path, tmp_path: Path) -> None:
    manifest = read_manifest(tiny_engines)
    with pytest.raises(
        EngineMismatchError, match=r"made for resolution 490 .config asks for 672: engines.export.resolution"
    ):
        check_engine_matches(manifest, tiny_engines, resolution=672)
    with pytest.raises(EngineMismatchError, match=r"max batch 4 .config asks for 8: batching.max_batch"):
        check_engine_matches(manifest, tiny_engines, batch=8)
    with pytest.raises(EngineMismatchError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(EngineMismatchError, match=r"manifest\.json is a file, not a folder"):
        read_manifest(tiny_engines / "manifest.json")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_engines, broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(EngineMismatchError, match=r"decoder graph file decoder.onnx is missing"):
        read_manifest(broken)
    data = json.loads((tiny_engines / "manifest.json").read_text())
    data["surprise"] = 1
    (broken / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="invalid manifest"):
        read_manifest(broken)


def test_an_engine_made_from_other_weights_than_the_export_config_names_is_refused(
    tiny_checkpoint: Path, tiny_engines: Path, tmp_path: Path
) -> None:
    from sam3stream.model.checkpoint import write_random_checkpoint

    manifest = read_manifest(tiny_engines)
    check_engine_source(manifest, tiny_engines, random=None, checkpoint=tiny_checkpoint)
    moved = shutil.copytree(tiny_checkpoint, tmp_path / "moved")
    check_engine_source(manifest, tiny_engines, random=None, checkpoint=moved)  # same weights
    other = write_random_checkpoint("tiny", tmp_path / "other", seed=1)
    with pytest.raises(EngineMismatchError, match=rf"made from {tiny_checkpoint}, but .* checkpoint {other}"):
        check_engine_source(manifest, tiny_engines, random=None, checkpoint=other)
    with pytest.raises(EngineMismatchError, match=r"asks for random:tiny:seed=0; move .* aside"):
        check_engine_source(manifest, tiny_engines, random="tiny")


def test_bad_frames_are_input_errors(tiny_engines: Path) -> None:
    backend = OnnxRuntimeBackend(tiny_engines)
    text = backend.encode_text(["person"])
    with pytest.raises(InputError, match=r"uint8 \[B, 490, 490, 3\]"):
        backend.infer(np.zeros((1, 448, 448, 3), np.uint8), text, 0.3)
    with pytest.raises(EngineMismatchError, match="batch of 5 frames"):
        backend.infer(np.zeros((5, 490, 490, 3), np.uint8), text, 0.3)


def test_export_arguments_are_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sam3stream.cli import main

    out = tmp_path / "e"
    assert main(["export", "--random", "tiny", "--resolution", "500", "--out", str(out)]) == 1
    assert "500 is not a valid input resolution" in capsys.readouterr().err
    assert main(["export", "--random", "tiny", "--resolution", "448", "--batch", "0", "--out", str(out)]) == 1
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert not out.exists()
    # An existing --out is replaced at the end: a file or a folder of something else is refused
    # at once, and left as it was.
    a_file, a_folder = tmp_path / "notes.txt", tmp_path / "photos"
    a_file.write_text("keep me")
    (a_folder / "x.jpg").parent.mkdir()
    (a_folder / "x.jpg").write_text("keep me")
    for taken, kind in ((a_file, "not a folder"), (a_folder, "a folder without manifest.json")):
        assert main(["export", "--random", "tiny", "--resolution", "448", "--out", str(taken)]) == 1
        assert f"{taken} exists and is {kind}" in capsys.readouterr().err
    assert a_file.read_text() == "keep me" and (a_folder / "x.jpg").read_text() == "keep me"
    assert not (tmp_path / ".shared").exists()


def test_an_unwritable_output_is_one_line_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sam3stream.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["checkpoint", "random", "tiny", "--out", str(blocker / "ckpt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and "Traceback" not in err


@pytest.mark.parametrize("graph", ["vision", "text", "geometry", "decoder"])
def test_no_intermediate_tensor_is_uint8(tiny_engines: Path, graph: str) -> None:
    """TensorRT's ONNX parser takes UINT8 only as a network input or output and refuses any node
    that makes an intermediate UINT8 tensor (the frames must be cast before they are permuted)."""
    import onnx

    manifest = read_manifest(tiny_engines)
    path = tiny_engines / manifest.graphs[graph].file
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    io = {v.name for v in (*model.graph.input, *model.graph.output)}
    uint8 = onnx.TensorProto.UINT8
    inner = [v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == uint8]
    assert not [name for name in inner if name not in io], f"{path}: uint8 intermediates {inner}"
    # Shape inference can miss tensors; the nodes that read a uint8 input must be casts.
    inputs = {v.name for v in model.graph.input if v.type.tensor_type.elem_type == uint8}
    readers = [n.op_type for n in model.graph.node if inputs.intersection(n.input)]
    assert all(op == "Cast" for op in readers), f"{path}: uint8 inputs read by {readers}"
