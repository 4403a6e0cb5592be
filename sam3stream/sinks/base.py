"""The sink protocol and the factory that builds a sink from its config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from sam3stream.errors import Sam3StreamError
from sam3stream.folders import make_writable_folder
from sam3stream.stream.frames import FrameResult
from sam3stream.zones import Zone

if TYPE_CHECKING:
    from sam3stream.config import SinkConfig
    from sam3stream.metrics import Metrics

__all__ = ["Sink", "check_output_folders", "make_sink"]


@runtime_checkable
class Sink(Protocol):
    """Where results go. The fan-out gives each sink its own queue and runner task.

    ``lossless`` sinks get backpressure (the pipeline waits for them); the others
    get a drop-oldest queue. ``wants_images`` tells the pipeline to keep the
    full-size frame (``Frame.image``) and pass it as ``image``; sinks that do
    not draw ignore ``image``.
    """

    name: str
    lossless: bool
    wants_images: bool

    async def start(self) -> None: ...

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None: ...

    async def aclose(self) -> None: ...


def make_sink(
    cfg: SinkConfig,
    *,
    name: str | None = None,
    metrics: Metrics | None = None,
    cameras: Sequence[str] = (),
    zones: Mapping[str, Sequence[Zone]] | None = None,
) -> Sink:
    """Build the sink a config entry describes (not started yet: call ``start()``).

    ``name`` defaults to the config's own name, else the sink type. ``cameras`` are the
    pipeline's cameras (the sink's own ``cameras`` narrow them): MQTT clears the retained
    status of any other camera under its prefix. ``zones``: each camera's, which the video
    sink outlines.
    """
    from sam3stream.config import JsonlSinkConfig, MqttSinkConfig, VideoSinkConfig

    label = name or cfg.name or str(cfg.__struct_config__.tag)
    if isinstance(cfg, JsonlSinkConfig):
        from sam3stream.sinks.jsonl import JsonlSink

        return JsonlSink.from_config(cfg, name=label, metrics=metrics)
    if isinstance(cfg, MqttSinkConfig):
        from sam3stream.sinks.mqtt import MqttSink

        return MqttSink.from_config(cfg, name=label, metrics=metrics, cameras=cameras)
    if isinstance(cfg, VideoSinkConfig):
        from sam3stream.sinks.video import VideoSink

        return VideoSink.from_config(cfg, name=label, metrics=metrics, zones=zones)
    raise TypeError(f"unknown sink config {type(cfg).__name__}")


def check_output_folders(sinks: Sequence[SinkConfig]) -> None:
    """Make each file sink's folder and check it takes a file, before the engine loads (a
    minute on a GPU): every folder that cannot be written is named in one error."""
    from sam3stream.config import JsonlSinkConfig, VideoSinkConfig, sink_name

    problems = []
    for i, cfg in enumerate(sinks):
        if isinstance(cfg, JsonlSinkConfig):
            folder, key = Path(cfg.path), "path"
        elif isinstance(cfg, VideoSinkConfig):
            folder, key = Path(cfg.dir), "dir"
        else:
            continue
        try:
            make_writable_folder(folder)
        except OSError as exc:
            why = exc.strerror or str(exc)
            problems.append(f"sink {sink_name(i, cfg)!r} (sinks[{i}].{key}) cannot write in {folder}: {why}")
    if problems:
        raise Sam3StreamError("; ".join(problems))
