"""Single-image inference: images + prompts -> JSON detections and annotated PNGs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.errors import InputError
from sam3stream.postprocess import to_detections
from sam3stream.runtime.types import Backend
from sam3stream.stream.frames import Detection

__all__ = ["ImageResult", "InferReport", "load_image", "output_stems", "run_infer"]

log = structlog.get_logger(__name__)


class ImageResult(msgspec.Struct):
    image: str
    width: int
    height: int
    resolution: int
    detections: list[Detection]


@dataclass
class InferReport:
    results: list[ImageResult]
    outputs: list[Path]
    stage_ms: dict[str, float] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)


def load_image(path: Path) -> npt.NDArray[np.uint8]:
    """RGB uint8 [H, W, 3]; any unreadable file is an InputError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"image {path} cannot be read as an image ({exc})") from None


def _square(image: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    from PIL import Image

    # SAM 3's preprocessing is a plain resize to the square input: the aspect is not kept.
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def run_infer(
    backend: Backend,
    images: list[Path],
    prompts: list[str],
    conf: float,
    output: Path,
    draw: bool = True,
) -> InferReport:
    if not images:
        raise InputError("no images given (use --image PATH, repeatable)")
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("give at least one non-empty prompt (use --prompt TEXT, repeatable)")
    repeated = sorted({p for p in prompts if prompts.count(p) > 1})
    if repeated:
        raise InputError(f"--prompt {', '.join(map(repr, repeated))} given more than once")
    if not 0.0 <= conf <= 1.0:
        raise InputError(f"--conf must be between 0 and 1, got {conf}")
    stems = output_stems(images, output)
    manifest = backend.manifest
    stage: dict[str, float] = {"text": 0.0, "load": 0.0, "vision": 0.0, "decoder": 0.0, "postprocess": 0.0}
    pictures = []
    t = time.perf_counter()
    for path in images:
        pictures.append(load_image(path))
    stage["load"] = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    text = backend.encode_text(prompts)
    stage["text"] = (time.perf_counter() - t) * 1e3
    output.mkdir(parents=True, exist_ok=True)
    thresholds = [conf] * len(prompts)
    report = InferReport(results=[], outputs=[], stage_ms=stage)
    for start in range(0, len(images), manifest.batch):
        chunk = list(range(start, min(start + manifest.batch, len(images))))
        t = time.perf_counter()
        frames = np.stack([_square(pictures[i], manifest.resolution) for i in chunk])
        stage["load"] += (time.perf_counter() - t) * 1e3
        raw = backend.infer(frames, text, conf)
        timings = getattr(backend, "last_timings", {})
        stage["vision"] += timings.get("vision", 0.0)
        stage["decoder"] += timings.get("decoder", 0.0)
        t = time.perf_counter()
        for b, i in enumerate(chunk):
            height, width = pictures[i].shape[:2]
            dets = to_detections(raw, b, list(prompts), thresholds, width, height)
            result = ImageResult(str(images[i]), width, height, manifest.resolution, dets)
            report.results.append(result)
            stem = stems[i]
            json_path = stem.with_suffix(".json")
            json_path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2))
            report.outputs.append(json_path)
            if draw:
                report.outputs.append(_annotate(pictures[i], dets, stem.with_suffix(".png")))
        stage["postprocess"] += (time.perf_counter() - t) * 1e3
    return report


def output_stems(images: list[Path], output: Path) -> list[Path]:
    """Where each image's .json and .png go: ``output/<name>``, with ``-2``, ``-3``... for names
    that repeat (a.jpg, x/a.jpg and a.png would overwrite each other). Refuses an output that
    would overwrite one of the images."""
    stems: list[Path] = []
    seen: dict[str, int] = {}
    for image in images:
        n = seen[image.stem] = seen.get(image.stem, 0) + 1
        stems.append(output / (image.stem if n == 1 else f"{image.stem}-{n}"))
    inputs = {image.resolve() for image in images}
    for stem in stems:
        for path in (stem.with_suffix(".json"), stem.with_suffix(".png")):
            if path.resolve() in inputs:
                raise InputError(f"--output {output} would overwrite the input image {path}; choose another")
    return stems


def _annotate(image: npt.NDArray[np.uint8], dets: list[Detection], path: Path) -> Path:
    from PIL import Image

    from sam3stream.draw import draw_detections

    Image.fromarray(draw_detections(image, dets)).save(path)
    return path
