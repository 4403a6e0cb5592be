"""sam3stream: run SAM 3 on many video streams at once.

The embedding API lives in :mod:`sam3stream.stream.pipeline`; it is re-exported
lazily here so that ``import sam3stream`` stays cheap (no numpy, no av).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sam3stream.config import Config
    from sam3stream.stream.pipeline import Pipeline

__all__ = ["Config", "Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from sam3stream.stream.pipeline import Pipeline

        return Pipeline
    if name == "Config":
        from sam3stream.config import Config

        return Config
    raise AttributeError(name)
