"""The demo's config: file cameras over the clips, onnxruntime on the CPU, JSONL + video sinks.

It is written as TOML next to the outputs and loaded back through
:func:`sam3stream.config.load_config`, so it passes the same validation as any
user config and ``sam3stream run <out>/demo.toml`` replays it.

On a CPU the model is far slower than the decoders, so every queue stays full,
and everything queued is processed when the run stops (the drain). Hence one
frame per camera, one batch ready, and batches of at most 4 although the engines
take 8: on a CPU a frame costs about the same in a batch of 4 as in one of 8,
while the frames in flight (latency, and the drain) double with 8.

Masks are published at a quarter of the clips' size: a random model's masks are
noise, whose run-length encoding at full size takes ~300 KB per frame. For the
same reason its videos show boxes only: drawn, its masks cover the whole frame.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

from sam3stream.config import Config, load_config

__all__ = ["CPU_MAX_BATCH", "PROMPTS", "DemoLayout", "assign_clips", "demo_config_text", "write_demo_config"]

PROMPTS = ("person", "cup", "cat", "rocket")
CPU_MAX_BATCH = 4
DRAIN_TIMEOUT_S = 20.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # camera names become file names and MQTT topic levels


@dataclass(frozen=True, slots=True)
class DemoLayout:
    """Where the demo keeps things under its output folder."""

    out: Path

    @property
    def clips(self) -> Path:
        return self.out / "clips"

    @property
    def jsonl(self) -> Path:
        return self.out / "jsonl"

    @property
    def video(self) -> Path:
        return self.out / "video"

    @property
    def config(self) -> Path:
        return self.out / "demo.toml"

    def clear_results(self) -> None:
        """Remove the previous run's JSONL files and videos, so the folders hold this run only."""
        for pattern, folder in (("*.jsonl", self.jsonl), ("*.mp4", self.video)):
            for path in folder.glob(pattern) if folder.is_dir() else ():
                path.unlink()


# On the first camera: its detections list the zone their centre is in, and its video outlines it.
DEMO_ZONE = """\
[[cameras.zones]]
name = "left_half"
polygon = [[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]]"""


def assign_clips(clips: Sequence[Path], cameras: int) -> list[tuple[str, Path]]:
    """``cameras`` (name, clip) pairs, cycling through the clips: cam1-astronaut, cam2-coffee, ..."""
    return [
        (f"cam{i + 1}-{_UNSAFE.sub('_', clip.stem)}", clip)
        for i, clip in enumerate(islice(cycle(clips), cameras))
    ]


def _s(value: str | Path) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(str(value))


def demo_config_text(
    *,
    cameras: Sequence[tuple[str, Path]],
    engine_dir: Path,
    layout: DemoLayout,
    max_batch: int,
    mask_size: tuple[int, int],
    draw_masks: bool = True,
    conf: float,
    thresholds: Mapping[str, float],
    mqtt: tuple[str, int] | None = None,
) -> str:
    lines = [
        "# Written by `sam3stream demo`; replay it with: sam3stream run <this file>",
        "",
        "[engines]",
        f"dir = {_s(engine_dir.resolve())}",
        'backend = "onnxruntime"',
        'device = "cpu"',
        "",
        "[prompts]",
        f"classes = {json.dumps(list(PROMPTS))}",
        f"conf = {conf!r}",
        f"mask_size = {list(mask_size)}",
    ]
    if thresholds:
        lines += ["", "# Random weights: thresholds measured by the demo so a few queries per class pass."]
        lines += ["[prompts.thresholds]", *(f"{_s(k)} = {v!r}" for k, v in thresholds.items())]
    lines += [
        "",
        "[batching]",
        f"max_batch = {max_batch}",
        "max_wait_ms = 20",
        "camera_queue = 1",
        "batch_queue = 1",
    ]
    for i, (name, clip) in enumerate(cameras):
        # No fps: decoded as fast as the model takes frames. No loop: a camera ends with its clip.
        lines += ["", "[[cameras]]", f"name = {_s(name)}", f"url = {_s(clip.resolve())}"]
        if i == 0:
            lines += [DEMO_ZONE]
    lines += ["", "[[sinks]]", 'type = "jsonl"', f"path = {_s(layout.jsonl.resolve())}"]
    lines += ["", "[[sinks]]", 'type = "video"', f"dir = {_s(layout.video.resolve())}"]
    lines += [f"draw_masks = {str(draw_masks).lower()}"]
    if mqtt is not None:
        host, port = mqtt
        lines += ["", "[[sinks]]", 'type = "mqtt"', f"host = {_s(host)}", f"port = {port}"]
    lines += [
        "",
        "[logging]",
        'level = "info"',
        "",
        "[lifecycle]",
        f"drain_timeout_s = {DRAIN_TIMEOUT_S}",
        "",
    ]
    return "\n".join(lines)


def write_demo_config(path: Path, text: str) -> Config:
    """Write the config file and load it back (validated, paths resolved)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return load_config(path)
