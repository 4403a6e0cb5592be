"""What every backend's graphs take: a checked batch of frames and the padding-box prompt."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sam3stream.errors import EngineMismatchError, InputError
from sam3stream.runtime.manifest import EngineManifest

__all__ = ["MAX_CLASSES", "PAD_BOX_LABEL", "check_frames"]

# The most prompts one run may use: the ONNX graphs' class axis is exported up to it. Each class
# runs the whole decoder on every frame, so memory and time grow with it.
MAX_CLASSES = 256

# transformers' Sam3Processor pads box prompts with label -10: such a box is masked out, so a
# text-only prompt still gets the geometry encoder's CLS token (as Meta's reference does).
PAD_BOX_LABEL = -10


def check_frames(frames: npt.NDArray[np.uint8], manifest: EngineManifest) -> None:
    """Frames must be [B, R, R, 3] uint8 with 1 <= B <= the engine's batch."""
    r = manifest.resolution
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (r, r, 3):
        raise InputError(f"frames must be uint8 [B, {r}, {r}, 3]; got {frames.dtype} {list(frames.shape)}")
    if not 1 <= frames.shape[0] <= manifest.batch:
        raise EngineMismatchError(
            f"batch of {frames.shape[0]} frames; the engines take 1..{manifest.batch} "
            "(export with a larger --batch or lower batching.max_batch)"
        )
