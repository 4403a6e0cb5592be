"""Recommend an input resolution for a card from measured benchmark rows.

The choice follows the user's decision framework: fit in GPU memory (with headroom for the
OS and other processes), reach the frames per second each camera needs, and keep enough
resolution for the objects that matter (hands and tools need >= 840, people >= 560).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sam3stream.errors import InputError

__all__ = [
    "BUNDLED",
    "OBJECT_MIN_RESOLUTION",
    "Candidate",
    "default_bench",
    "format_plan",
    "load_bench",
    "plan",
]

OBJECT_MIN_RESOLUTION = {"small": 840, "large": 560}


@dataclass(frozen=True)
class Candidate:
    resolution: int
    measured_cameras: int
    memory_mib: float
    fps_per_camera: float  # scaled to the target card
    problems: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.problems


# `sam3stream bench` tables shipped with the package (docs/bench/h200.json, h100.json).
BUNDLED = {"h200": "bench_h200.json", "h100": "bench_h100.json"}


def default_bench(card: str = "h200") -> dict[str, Any]:
    """The bundled table measured on ``card`` (a key of BUNDLED)."""
    if card not in BUNDLED:
        raise InputError(f"no bundled measurements for {card!r}: choose one of {', '.join(BUNDLED)}")
    text = resources.files("sam3stream.data").joinpath(BUNDLED[card]).read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def load_bench(path: Path | None, card: str = "h200") -> dict[str, Any]:
    """The `sam3stream bench` result at ``path``, else the bundled table of ``card``."""
    if path is None:
        return default_bench(card)
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"benchmark file {path} does not exist (make one with `sam3stream bench`)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"benchmark file {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("ours"), list):
        raise InputError(f"benchmark file {path} has no 'ours' rows: not a `sam3stream bench` result")
    measured = _measured_rows(data)
    if not measured:
        raise InputError(f"benchmark file {path} has no measured rows (none with total_fps)")
    for i, row in enumerate(measured):
        missing = [k for k in ("resolution", "cameras") if k not in row]
        if row.get("nvml_peak_mib") is None and row.get("alloc_peak_mib") is None:
            missing.append("nvml_peak_mib or alloc_peak_mib")
        if missing:
            raise InputError(f"benchmark file {path}: measured row {i} lacks {', '.join(missing)}")
        if not _memory_mib(row) > 0:
            raise InputError(
                f"benchmark file {path}: measured row {i} has no GPU memory figure (a run on the CPU?); "
                "plan from a `sam3stream bench` run on a GPU"
            )
    return data


def _memory_mib(row: dict[str, Any]) -> float:
    return float(row.get("nvml_peak_mib") or row.get("alloc_peak_mib") or 0.0)


def _measured_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    """Our rows with a measurement (a failed one carries only its error)."""
    return [r for r in bench["ours"] if isinstance(r, dict) and "total_fps" in r]


def plan(
    bench: dict[str, Any],
    *,
    vram_gib: float,
    cameras: int,
    min_fps_per_camera: float = 0.0,
    objects: str = "large",
    speed_ratio: float = 1.0,
    headroom: float = 0.15,
) -> list[Candidate]:
    """Every measured resolution with what (if anything) rules it out, best first."""
    for flag, value, low in (
        ("--vram-gb", vram_gib, 0.0),
        ("--speed-ratio", speed_ratio, 0.0),
    ):
        if not (math.isfinite(value) and value > low):
            raise InputError(f"{flag} must be a number > 0, got {value:g}")
    if not (math.isfinite(min_fps_per_camera) and min_fps_per_camera >= 0):
        raise InputError(f"--min-fps must be a number >= 0, got {min_fps_per_camera:g}")
    if cameras < 1:
        raise InputError(f"--cameras must be >= 1, got {cameras}")
    if not 0 <= headroom < 1:
        raise InputError(f"--headroom is the share of memory kept free: from 0 up to 1, got {headroom:g}")
    if objects not in OBJECT_MIN_RESOLUTION:
        raise InputError(f"--objects must be one of {', '.join(OBJECT_MIN_RESOLUTION)}, got {objects!r}")
    budget = vram_gib * 1024 * (1 - headroom)
    rows = _measured_rows(bench)
    candidates = []
    for res in sorted({r["resolution"] for r in rows}, reverse=True):
        at_res = sorted((r for r in rows if r["resolution"] == res), key=lambda r: r["cameras"])
        # The row measured with at least as many cameras (a batch that large), else the largest.
        row = next((r for r in at_res if r["cameras"] >= cameras), at_res[-1])
        memory = _memory_mib(row)
        # Frames per second of the whole card, shared by the cameras.
        fps = row["total_fps"] * speed_ratio / cameras
        problems = []
        if memory > budget:
            problems.append(f"needs {memory:.0f} MiB, {budget:.0f} MiB usable")
        if fps < min_fps_per_camera:
            problems.append(f"{fps:.1f} FPS per camera < {min_fps_per_camera:g}")
        if res < OBJECT_MIN_RESOLUTION[objects]:
            problems.append(f"{objects} objects need >= {OBJECT_MIN_RESOLUTION[objects]}")
        candidates.append(Candidate(res, int(row["cameras"]), memory, fps, tuple(problems)))
    return candidates


def format_plan(candidates: list[Candidate], cameras: int) -> str:
    # "from": the row each line comes from. A service batches at most 8 frames, so more cameras
    # share that backend: its memory stays, and its frames per second are divided among them.
    lines = [f"{'resolution':>10}  {'MiB':>6}  {'FPS/cam':>7}  {'from':>7}  verdict"]
    for c in candidates:
        verdict = "fits" if c.fits else "; ".join(c.problems)
        source = f"{c.measured_cameras} cam"
        lines.append(
            f"{c.resolution:>10}  {c.memory_mib:>6.0f}  {c.fps_per_camera:>7.1f}  {source:>7}  {verdict}"
        )
    best = next((c for c in candidates if c.fits), None)
    cams = f"{cameras} camera{'s' if cameras != 1 else ''}"
    if best is None:
        lines.append(f"no measured resolution fits {cams}: relax a constraint or use fewer cameras per card")
    else:
        lines.append(
            f"recommended: {best.resolution}, the highest resolution that fits {cams} "
            f"(engines: sam3stream export ... --resolution {best.resolution} --batch {min(cameras, 8)})"
        )
    return "\n".join(lines)
