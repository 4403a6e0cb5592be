"""Building blocks for stream tests: configs, an in-memory sink, a stand-in postprocess."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sam3stream.config import Config, parse_config
from sam3stream.runtime.types import RawOutputs
from sam3stream.stream.frames import Detection, FrameResult

__all__ = ["MemorySink", "camera_toml", "make_config", "stub_postprocess"]


def camera_toml(name: str, url: str | Path, **fields: Any) -> str:
    lines = ["[[cameras]]", f'name = "{name}"', f'url = "{url}"']
    for key, value in fields.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def make_config(
    base: Path,
    cameras: str,
    *,
    max_batch: int = 4,
    max_wait_ms: float = 10,
    extra: str = "",
    stall_timeout_s: float = 5,
    drain_timeout_s: float = 10,
) -> Config:
    """A fake-backend config with the given ``[[cameras]]`` blocks (TOML text)."""
    text = f"""
[engines]
dir = "engines/fake"
backend = "fake"

[prompts]
classes = ["person", "hand"]
conf = 0.05

[batching]
max_batch = {max_batch}
max_wait_ms = {max_wait_ms}

[lifecycle]
drain_timeout_s = {drain_timeout_s}
stall_timeout_s = {stall_timeout_s}
reconnect_base_s = 0.05
reconnect_cap_s = 0.3

{cameras}
{extra}
"""
    return parse_config(text, source="test", base_dir=base)


def stub_postprocess(
    raw: RawOutputs,
    b: int,
    labels: Sequence[str],
    thresholds: Sequence[float],
    width: int,
    height: int,
    mask_size: tuple[int, int] | None,
) -> list[Detection]:
    """The best query per class when it clears its threshold; no masks."""
    out = []
    for c, label in enumerate(labels):
        score = float(raw.scores[b, c, 0])
        if score >= thresholds[c]:
            box = tuple(float(v) for v in raw.boxes[b, c, 0])
            px = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
            out.append(Detection(label=label, score=score, box=box, box_px=px))  # type: ignore[arg-type]
    return out


class MemorySink:
    """Keeps every result it gets, per camera; can be told to fail or to be slow."""

    wants_images = False

    def __init__(
        self,
        name: str = "memory",
        *,
        lossless: bool = True,
        fail_every: int = 0,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.lossless = lossless
        self.fail_every = fail_every
        self.delay_s = delay_s
        self.results: dict[str, list[FrameResult]] = defaultdict(list)
        self.calls = 0
        self.started = False
        self.closed = False
        self.states: list[tuple[str, str, str | None]] = []
        self.states_after_close: list[tuple[str, str]] = []  # lost on a real sink (MQTT)
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        self.started = True

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError(f"sink {self.name} fails on call {self.calls}")
        self.results[result.camera].append(result)
        self._arrived.set()

    async def wait_for(self, camera: str, count: int = 1) -> None:
        """Until ``camera`` has ``count`` results (wrap it in a timeout)."""
        while len(self.results[camera]) < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def publish_status(self, camera: str, state: str, detail: str | None = None) -> None:
        self.states.append((camera, state, detail))
        if self.closed:
            self.states_after_close.append((camera, state))
        self._arrived.set()

    async def wait_for_state(self, camera: str, state: str, count: int = 1) -> None:
        """Until ``camera`` has reported ``state`` ``count`` times (wrap it in a timeout)."""
        while sum(1 for c, s, _ in self.states if (c, s) == (camera, state)) < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def aclose(self) -> None:
        self.closed = True

    def seqs(self, camera: str) -> list[int]:
        return [r.seq for r in self.results[camera]]
