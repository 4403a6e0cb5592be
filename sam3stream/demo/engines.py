"""The demo's engines: export the tiny random model once, and pick thresholds it can pass.

A randomly initialised SAM 3 scores every (query, class) pair at about
sigmoid(0) * sigmoid(0) = 0.25, all inside a band a few thousandths wide whose
place depends on the weights. A fixed confidence either keeps every query (200
detections per frame) or none, so for a random model the demo measures the band
on the clips' first frames and puts each class's threshold just under its
``keep``-th best score: a few detections per class and frame. They show the
plumbing (masks, boxes, JSONL, video), not what is in the frames.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import av
import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.errors import BackendUnavailableError, InputError
from sam3stream.runtime.manifest import MANIFEST_NAME, EngineManifest, read_manifest

__all__ = ["DEMO_BATCH", "DEMO_QUERIES", "calibrate_thresholds", "ensure_engines", "is_random"]

log = structlog.get_logger(__name__)

DEMO_BATCH = 8
DEMO_QUERIES = 50
# How far under the measured score a threshold goes: a random model's scores move by about
# 1e-7 from frame to frame, while neighbouring queries are 1e-5 and more apart.
_MARGIN = 1e-6


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_engines(
    engine_dir: Path, resolution: int, progress: Callable[[str], None] = _stderr
) -> EngineManifest:
    """Read ``engine_dir``'s manifest, first exporting the tiny random model there if it has none."""
    if not (engine_dir / MANIFEST_NAME).is_file():
        if engine_dir.is_dir() and any(engine_dir.iterdir()):
            raise InputError(
                f"{engine_dir} exists but holds no {MANIFEST_NAME}; remove it or pass another --engines"
            )
        try:
            from sam3stream.model.export import export_engines
        except ImportError as exc:
            raise BackendUnavailableError(
                f"making the demo engines needs {exc.name or exc}: pip install 'sam3stream[export]'"
            ) from exc
        progress(f"exporting the tiny random model to {engine_dir} (once; about a minute on a CPU)")
        log.info("demo_export_started", out=str(engine_dir), resolution=resolution)
        export_engines(
            random="tiny",
            resolution=resolution,
            batch=DEMO_BATCH,
            queries=DEMO_QUERIES,
            out=engine_dir,
            progress=lambda step: progress(f"  {step}"),
        )
    manifest = read_manifest(engine_dir)
    if manifest.resolution != resolution:
        log.warning(
            "demo_engines_resolution",
            dir=str(engine_dir),
            engines=manifest.resolution,
            asked=resolution,
            using=manifest.resolution,
        )
    return manifest


def is_random(manifest: EngineManifest) -> bool:
    """Whether the engines hold seeded random weights (``sam3stream export --random``)."""
    return manifest.model.source.startswith("random:")


def first_frame(clip: Path, resolution: int) -> npt.NDArray[np.uint8]:
    """A clip's first frame at the model's R x R input, resized the way camera sources do it."""
    with av.open(str(clip)) as container:
        for frame in container.decode(video=0):
            rgb = frame.reformat(width=resolution, height=resolution, format="rgb24")
            return np.asarray(rgb.to_ndarray(), dtype=np.uint8)
    raise InputError(f"{clip} has no video frames")


def calibrate_thresholds(
    engine_dir: Path, clips: Sequence[Path], classes: Sequence[str], *, keep: int = 2
) -> dict[str, float]:
    """Per class: a threshold that about ``keep`` queries per frame reach, measured on ``clips``."""
    from sam3stream.runtime.loader import open_backend

    backend = open_backend("onnxruntime", engine_dir, "cpu")
    try:
        manifest = backend.manifest
        keep = max(1, min(keep, manifest.queries))
        frames = np.stack([first_frame(c, manifest.resolution) for c in clips[: manifest.batch]])
        text = backend.encode_text(list(classes))
        scores = backend.infer(frames, text, min_score=1.0).scores  # [B, C, K]; 1.0: no masks needed
    finally:
        backend.close()
    kth = np.sort(scores, axis=2)[:, :, -keep].min(axis=0)
    thresholds = {label: max(0.0, float(kth[i]) - _MARGIN) for i, label in enumerate(classes)}
    log.info("demo_thresholds", keep=keep, **{k: round(v, 6) for k, v in thresholds.items()})
    return thresholds
