"""Export the four parts to ONNX and write an engine directory with its manifest.

Exporter choice (see docs/export.md): the dynamo exporter at opset 23 maps
scaled_dot_product_attention to the ONNX ``Attention`` op, which onnxruntime runs markedly
faster than the TorchScript exporter's decomposed attention. The DETR decoder's SDPA call
does not trace under dynamo (a view/stride error), so that sub-module exports with eager
attention; the result is the same maths.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from sam3stream.errors import InputError
from sam3stream.model.checkpoint import LoadedModel, load_checkpoint, write_random_checkpoint
from sam3stream.model.parts import Parts, padding_boxes, split_model
from sam3stream.resolution import check_resolution
from sam3stream.runtime.contract import MAX_CLASSES
from sam3stream.runtime.manifest import (
    MANIFEST_NAME,
    EngineManifest,
    GraphSpec,
    TensorSpec,
    write_manifest,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

__all__ = ["OPSET", "default_engine_dir", "export_engines", "load_source"]

log = structlog.get_logger(__name__)

OPSET = 23
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
# Graphs above this size keep their weights in a side file (protobuf caps a model at 2 GB).
EXTERNAL_DATA_BYTES = 256 << 20


def default_engine_dir(batch: int, queries: int, resolution: int, root: Path = Path("engines")) -> Path:
    """The user's naming: engines/b{batch}_q{queries}_r{resolution}."""
    return root / f"b{batch}_q{queries}_r{resolution}"


def load_source(
    *, random: str | None, checkpoint: Path | None, resolution: int, seed: int = 0, cache: Path
) -> LoadedModel:
    """Load the model from a checkpoint directory, or write (once) and load a random one."""
    if (random is None) == (checkpoint is None):
        raise ValueError("give exactly one of a checkpoint directory or a random model size")
    if random is not None:
        checkpoint = _random_checkpoint_dir(cache, random, seed)
        if not (checkpoint / "config.json").is_file():
            log.info("writing random checkpoint", size=random, seed=seed, path=str(checkpoint))
            write_random_checkpoint(random, checkpoint, seed=seed)
        loaded = load_checkpoint(checkpoint, resolution)
        loaded.source = f"random:{random}:seed={seed}"
        return loaded
    assert checkpoint is not None
    return load_checkpoint(checkpoint, resolution)


def _random_checkpoint_dir(cache: Path, size: str, seed: int) -> Path:
    return cache / f"random-{size}-seed{seed}"


def _check_replaceable(out: Path) -> None:
    """An existing ``out`` is replaced at the end: only an engine directory or an empty folder,
    never a file or a folder of something else. Checked before the minutes of export."""
    if not out.exists():
        return
    if out.is_dir() and ((out / MANIFEST_NAME).is_file() or not any(out.iterdir())):
        return
    kind = "a folder without manifest.json" if out.is_dir() else "not a folder"
    raise InputError(f"{out} exists and is {kind}: the export would replace it; give a new or engine folder")


def _use_eager_attention_in_decoder(model: Any) -> None:
    model.config.detr_decoder_config._attn_implementation = "eager"


def _export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic: list[dict[int, Any]],
) -> None:
    import logging

    import torch

    # The exporter logs a warning per torchvision op it cannot register when torchvision is absent.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=tuple(dynamic),
            verbose=False,
        )
    assert program is not None
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=size > EXTERNAL_DATA_BYTES)


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool", 2: "uint8"}


def _specs(values: Any) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
        specs.append(
            TensorSpec(value.name, shape, _ONNX_DTYPES.get(tensor_type.elem_type, str(tensor_type.elem_type)))
        )
    return specs


def _graph_spec(path: Path, engine_dir: Path) -> GraphSpec:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return GraphSpec(
        file=os.path.relpath(path, engine_dir), inputs=_specs(graph.input), outputs=_specs(graph.output)
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link where possible so a shared graph costs no extra disk."""
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    import sam3stream

    return {
        "sam3stream": sam3stream.__version__,
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
    }


class _Progress:
    def __init__(self, total: int, callback: Callable[[str], None] | None) -> None:
        self.total, self.done, self.callback = total, 0, callback
        self.start = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if self.callback is not None:  # the caller shows it (a progress line, or its own log)
            self.callback(f"[{self.done}/{self.total}] {what} ({elapsed:.0f} s)")
        else:
            log.info("export", step=self.done, of=self.total, what=what, elapsed_s=round(elapsed, 1))


def export_engines(
    *,
    random: str | None = None,
    checkpoint: Path | None = None,
    resolution: int,
    batch: int = 8,
    queries: int = 50,
    out: Path,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export the vision, text, geometry and decoder graphs for one resolution into ``out``.

    The text graph does not depend on the resolution: it is exported once per set of
    weights into ``out.parent/.shared`` and hard-linked into each engine directory.
    """
    from sam3stream.model.roi_align import install_into_transformers

    check_resolution(resolution)
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    out = Path(out)
    _check_replaceable(out)
    shared = out.parent / ".shared"
    install_into_transformers()
    steps = _Progress(6, progress)
    loaded = load_source(random=random, checkpoint=checkpoint, resolution=resolution, seed=seed, cache=shared)
    model = loaded.model
    _use_eager_attention_in_decoder(model)
    parts = split_model(model, queries)
    kept = f", weights kept in {_random_checkpoint_dir(shared, random, seed)}" if random is not None else ""
    steps.step(f"loaded {loaded.source} at {resolution}x{resolution}{kept}")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = _export_all(
        parts, resolution, batch, tmp, shared / f"text-{loaded.checkpoint_sha256[:16]}", steps
    )

    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    for name in TOKENIZER_FILES:
        if (loaded.tokenizer_dir / name).is_file():
            shutil.copy2(loaded.tokenizer_dir / name, tok_dir / name)

    manifest = EngineManifest(
        resolution=resolution,
        batch=batch,
        queries=queries,
        precision="float32",
        model=loaded.spec(),
        graphs={name: _graph_spec(path, tmp) for name, path in files.items()},
        tokenizer="tokenizer",
        versions=_versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    steps.step(f"wrote {out}")
    return out


def _export_all(
    parts: Parts, resolution: int, batch: int, out: Path, text_cache: Path, steps: _Progress
) -> dict[str, Path]:
    import torch

    # Example inputs: batch 2 (not 1), so the exporter does not specialise the batch axis.
    example = 2 if batch >= 2 else 1
    frames = torch.randint(0, 256, (example, resolution, resolution, 3), dtype=torch.uint8)
    batch_dim: Any = torch.export.Dim("batch", min=1, max=batch) if batch >= 2 else None
    class_dim = torch.export.Dim("classes", min=1, max=MAX_CLASSES)
    files: dict[str, Path] = {}

    files["vision"] = out / "vision.onnx"
    _export(parts.vision, (frames,), files["vision"], ["frames"], ["fpn0", "fpn1", "fpn2"], [{0: batch_dim}])
    steps.step("exported vision encoder")

    with torch.no_grad():
        fpn0, fpn1, fpn2 = parts.vision(frames)
    boxes, labels = padding_boxes(example)
    files["geometry"] = out / "geometry.onnx"
    _export(
        parts.geometry,
        (fpn2, boxes, labels),
        files["geometry"],
        ["fpn2", "boxes", "box_labels"],
        ["geo_features", "geo_mask"],
        [{0: batch_dim}, {0: batch_dim}, {0: batch_dim}],
    )
    steps.step("exported geometry encoder")

    context = parts.text.text_encoder.config.max_position_embeddings
    ids = torch.randint(0, 1000, (2, context), dtype=torch.long)
    mask = torch.ones(2, context, dtype=torch.long)
    if (text_cache / "text.onnx").is_file():
        steps.step(f"reused text encoder from {text_cache}")
    else:
        partial = text_cache.with_name(text_cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _export(
            parts.text,
            (ids, mask),
            partial / "text.onnx",
            ["input_ids", "attention_mask"],
            ["text_features"],
            [{0: class_dim}, {0: class_dim}],
        )
        partial.rename(text_cache)
        steps.step("exported text encoder (shared by every resolution)")
    for shared_file in text_cache.iterdir():  # text.onnx and, for large models, its weights file
        _link_or_copy(shared_file, out / shared_file.name)
    files["text"] = out / "text.onnx"

    with torch.no_grad():
        text = parts.text(ids, mask)
        geo, geo_mask = parts.geometry(fpn2, boxes, labels)
    files["decoder"] = out / "decoder.onnx"
    per_frame = {0: batch_dim}
    per_class = {0: class_dim}
    _export(
        parts.decoder,
        (fpn0, fpn1, fpn2, text, mask.bool(), geo, geo_mask),
        files["decoder"],
        ["fpn0", "fpn1", "fpn2", "text_features", "text_mask", "geo_features", "geo_mask"],
        ["scores", "boxes", "masks", "presence", "query_index"],
        [per_frame, per_frame, per_frame, per_class, per_class, per_frame, per_frame],
    )
    steps.step("exported decoder")
    return files
