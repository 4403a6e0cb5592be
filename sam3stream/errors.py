"""Error types. Every error a user can cause is a :class:`Sam3StreamError`:
the CLI prints its message (no traceback) and exits non-zero."""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigError",
    "EngineDeadError",
    "EngineMismatchError",
    "GpuMemoryError",
    "InputError",
    "PostprocessError",
    "ResolutionError",
    "Sam3StreamError",
]


class Sam3StreamError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class ResolutionError(Sam3StreamError, ValueError):
    """A model input resolution that is not a multiple of 14 in the supported range."""


class CheckpointError(Sam3StreamError):
    """A checkpoint directory that is missing files or holds corrupt ones."""


class EngineMismatchError(Sam3StreamError):
    """An engine directory whose manifest does not match what was asked for."""


class InputError(Sam3StreamError):
    """Bad user input: an unreadable image, an empty prompt list, ..."""


class BackendUnavailableError(Sam3StreamError):
    """The requested runtime backend cannot run here (missing package or device)."""


class GpuMemoryError(Sam3StreamError):
    """The device cannot hold the engines and buffers for the requested batch and resolution."""


class EngineDeadError(Sam3StreamError):
    """The inference engine failed in a way that cannot be recovered: stop everything."""


class PostprocessError(Sam3StreamError):
    """Turning a frame's model outputs into detections failed (a bug, not bad input): stop
    everything, naming the camera and frame, rather than publish a result without them."""


class ConfigError(Sam3StreamError):
    """One or more configuration problems, each with the key path that caused it."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{where}{path}: {msg}" if path else f"{where}{msg}" for path, msg in problems]
        super().__init__("\n".join(lines))
