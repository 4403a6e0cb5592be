"""manifest.json: what an engine directory holds and for which shapes it was made.

An engine directory holds the graphs for one (resolution, batch, queries, precision):
``vision``, ``text``, ``geometry`` and ``decoder``, plus the tokenizer files.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from sam3stream.errors import EngineMismatchError
from sam3stream.resolution import PATCH

__all__ = [
    "GRAPH_NAMES",
    "MANIFEST_NAME",
    "EngineManifest",
    "GraphSpec",
    "ModelSpec",
    "TensorSpec",
    "check_engine_matches",
    "check_engine_source",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
GRAPH_NAMES = ("vision", "text", "geometry", "decoder")


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    shape: list[int | str]  # a str is a symbolic (dynamic) axis, e.g. "batch"
    dtype: str  # numpy dtype name: float32, float16, int64, bool


class GraphSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    file: str  # relative to the engine directory
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sha256: str = ""


class ModelSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    source: str  # "random:tiny:seed=0" or the checkpoint directory it came from
    checkpoint_sha256: str  # hash of the weights file(s): identifies the weights across resolutions
    hidden_size: int  # FPN / DETR width (256 for the real model)
    text_context: int  # tokens per prompt (32)
    num_queries: int  # decoder queries before top-K (200)


class EngineManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    resolution: int
    batch: int  # the largest batch the graphs accept (any 1..batch runs)
    queries: int  # K kept per frame and class
    precision: str  # float32 for ONNX; TensorRT builds record their own
    model: ModelSpec
    graphs: dict[str, GraphSpec]
    tokenizer: str  # folder (relative) holding tokenizer.json
    versions: dict[str, str]
    created: str
    format: int = FORMAT_VERSION
    engine_kind: str = "onnx"  # "onnx" or "tensorrt"

    @property
    def grid(self) -> int:
        return self.resolution // PATCH

    @property
    def mask_size(self) -> int:
        return 4 * self.grid


def read_manifest(engine_dir: Path) -> EngineManifest:
    """Load and sanity-check ``engine_dir/manifest.json``; errors name the directory."""
    path = Path(engine_dir) / MANIFEST_NAME
    if Path(engine_dir).exists() and not Path(engine_dir).is_dir():
        raise EngineMismatchError(f"engine directory {engine_dir} is a file, not a folder")
    if not Path(engine_dir).is_dir():
        raise EngineMismatchError(
            f"engine directory {engine_dir} does not exist; make one with "
            f"`sam3stream export --random tiny --resolution R --out {engine_dir}`"
        )
    if not path.is_file():
        raise EngineMismatchError(f"{engine_dir} has no {MANIFEST_NAME}: it is not an engine directory")
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=EngineManifest)
    except msgspec.ValidationError as exc:
        raise EngineMismatchError(f"{path}: invalid manifest: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EngineMismatchError(f"{path}: not valid JSON: {exc}") from None
    if manifest.format != FORMAT_VERSION:
        raise EngineMismatchError(
            f"{path}: manifest format {manifest.format}, this sam3stream reads format {FORMAT_VERSION}; "
            "export the engines again"
        )
    missing = [g for g in GRAPH_NAMES if g not in manifest.graphs]
    if missing:
        raise EngineMismatchError(f"{path}: graphs missing from the manifest: {', '.join(missing)}")
    for name, graph in manifest.graphs.items():
        if not (Path(engine_dir) / graph.file).is_file():
            raise EngineMismatchError(f"{engine_dir}: the {name} graph file {graph.file} is missing")
    return manifest


def write_manifest(engine_dir: Path, manifest: EngineManifest) -> Path:
    path = Path(engine_dir) / MANIFEST_NAME
    path.write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2) + b"\n")
    return path


def check_engine_matches(
    manifest: EngineManifest,
    engine_dir: Path,
    *,
    resolution: int | None = None,
    batch: int | None = None,
    queries: int | None = None,
) -> None:
    """Raise if the engine directory was made for other shapes than the configuration asks for."""
    problems = []
    if resolution is not None and manifest.resolution != resolution:
        problems.append(
            f"resolution {manifest.resolution} (config asks for {resolution}: engines.export.resolution)"
        )
    if batch is not None and manifest.batch < batch:
        problems.append(f"max batch {manifest.batch} (config asks for {batch}: batching.max_batch)")
    if queries is not None and manifest.queries != queries:
        problems.append(f"queries {manifest.queries} (config asks for {queries}: engines.export.queries)")
    if problems:
        raise EngineMismatchError(
            f"engine directory {engine_dir} was made for "
            + ", ".join(problems)
            + "; export a matching one (sam3stream export ... --out DIR) or change the config"
        )


def check_engine_source(
    manifest: EngineManifest,
    engine_dir: Path,
    *,
    random: str | None,
    seed: int = 0,
    checkpoint: Path | None = None,
) -> None:
    """Raise if the engine directory was made from other weights than ``[engines.export]`` names
    (the export runs only when the directory is missing, so an edited config would otherwise
    keep serving the old weights). A checkpoint found at another path passes when its weights
    hash to the manifest's."""
    made = manifest.model.source
    from_checkpoint = not made.startswith("random:")
    if random is not None:
        wanted = f"random:{random}:seed={seed}"
        if made == wanted:
            return
    else:
        if checkpoint is None:
            raise ValueError("give random or checkpoint")
        wanted = f"checkpoint {checkpoint}"
        if from_checkpoint and Path(made).resolve() == checkpoint.resolve():
            return
        if from_checkpoint and checkpoint.is_dir():
            from sam3stream.model.checkpoint import weights_sha256  # only for a moved checkpoint

            if weights_sha256(checkpoint) == manifest.model.checkpoint_sha256:
                return
    raise EngineMismatchError(
        f"engine directory {engine_dir} was made from {made}, but [engines.export] asks for "
        f"{wanted}; move {engine_dir} aside so that the next start exports it, or set engines.dir "
        "to another folder"
    )
