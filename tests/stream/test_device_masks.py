"""Masks encoded by the backend ([postprocess] device_masks): the worker asks a backend that
offers it for each frame's mask size, and the detections are those the host's encoder makes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest

from sam3stream.config import Config
from sam3stream.postprocess import _mask_counts
from sam3stream.runtime.fake import FakeBackend
from sam3stream.runtime.types import RawOutputs, TextFeatures
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config
from tests.stream.test_post_processes import labelled_by_process


class _Encodes(FakeBackend):
    """The fake, encoding its own masks on request (on the host, as the real thing would on the
    device), and keeping the sizes it was asked for."""

    encodes_masks = True

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[list[tuple[int, int]] | None] = []

    def infer(  # type: ignore[override]
        self,
        frames: npt.NDArray[np.uint8],
        text: TextFeatures,
        min_score: float,
        mask_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> RawOutputs:
        out = super().infer(frames, text, min_score)
        self.asked.append(None if mask_sizes is None else list(mask_sizes))
        if mask_sizes is None:
            return out
        counts = tuple(
            _mask_counts(mask, *mask_sizes[int(b)])
            for mask, b in zip(out.masks, out.mask_index[:, 0], strict=True)
        )
        return dataclasses.replace(out, masks=out.masks[:, :0, :0], mask_counts=counts)


def _config(tmp_path: Path, video: Callable[..., Path], extra: str = "", mask_size: Any = None) -> Config:
    cams = camera_toml("wide", video("w.mp4", frames=6, width=96, height=54)) + camera_toml(
        "tall", video("t.mp4", frames=6, width=48, height=80)
    )
    config = make_config(tmp_path, cams, extra=extra)
    if mask_size is not None:
        config = msgspec.structs.replace(
            config, prompts=msgspec.structs.replace(config.prompts, mask_size=mask_size)
        )
    return config


async def _run(config: Config, backend: FakeBackend, **kwargs: Any) -> MemorySink:
    sink = MemorySink()
    async with Pipeline(config, backend=backend, sinks=[sink], **kwargs) as p:
        await asyncio.wait_for(p.wait(), 120)
    return sink


def _detections(sink: MemorySink) -> dict[str, list[Any]]:
    return {camera: [r.detections for r in results] for camera, results in sink.results.items()}


async def test_the_backend_encodes_at_each_frames_size(tmp_path: Path, video: Callable[..., Path]) -> None:
    backend = _Encodes()
    encoded = await _run(_config(tmp_path, video), backend)
    on_host = await _run(_config(tmp_path, video), FakeBackend())
    sizes = {size for asked in backend.asked for size in asked or []}
    assert sizes == {(96, 54), (48, 80)}
    assert None not in backend.asked
    assert _detections(encoded) == _detections(on_host)
    assert any(d.mask is not None for ds in _detections(encoded)["wide"] for d in ds)


async def test_the_configured_mask_size_is_asked_for(tmp_path: Path, video: Callable[..., Path]) -> None:
    backend = _Encodes()
    sink = await _run(_config(tmp_path, video, mask_size=(40, 30)), backend)
    assert {size for asked in backend.asked for size in asked or []} == {(40, 30)}
    masks = [d.mask for ds in _detections(sink)["tall"] for d in ds if d.mask is not None]
    assert masks and {m.size for m in masks} == {(30, 40)}  # (h, w)


async def test_device_masks_off_leaves_the_masks_to_the_host(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    backend = _Encodes()
    config = _config(tmp_path, video, extra="[postprocess]\ndevice_masks = false\n")
    sink = await _run(config, backend)
    assert backend.asked and set(backend.asked) == {None}
    assert any(d.mask is not None for ds in _detections(sink)["wide"] for d in ds)


async def test_encoded_frames_stay_out_of_the_processes(tmp_path: Path, video: Callable[..., Path]) -> None:
    """Packing runs into a string costs less than sending a frame to a process."""
    sink = await _run(_config(tmp_path, video), _Encodes(), postprocess=labelled_by_process, post_processes=2)
    pids = {d.label for results in sink.results.values() for r in results for d in r.detections}
    assert pids == {str(os.getpid())}


def test_a_bad_device_masks_value_names_the_key(tmp_path: Path, video: Callable[..., Path]) -> None:
    from sam3stream.errors import ConfigError

    with pytest.raises(ConfigError, match=r"postprocess\.device_masks"):
        _config(tmp_path, video, extra='[postprocess]\ndevice_masks = "gpu"\n')
