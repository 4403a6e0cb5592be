"""The small interface between the stream half and the runtimes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from sam3stream.runtime.manifest import EngineManifest

__all__ = ["Backend", "RawOutputs", "TextFeatures"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TextFeatures:
    """Encoded prompts, one row per class, in prompt order.

    ``features`` is [C, 32, D] float32 and ``mask`` [C, 32] bool (True = real token).
    Backends may keep device copies of their own; these host arrays are the reference.
    """

    prompts: tuple[str, ...]
    features: F32
    mask: npt.NDArray[np.bool_]

    @property
    def num_classes(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True, slots=True)
class RawOutputs:
    """Decoder outputs for B frames x C classes, top-K queries each, on the host.

    - ``scores`` [B, C, K]: sigmoid(logit) * sigmoid(presence), best first.
    - ``boxes`` [B, C, K, 4]: normalized xyxy in the model's square input.
    - ``presence`` [B, C]: sigmoid(presence logit).
    - ``query_index`` [B, C, K]: which of the decoder's queries each row came from.
    - ``masks`` [N, M, M]: mask logits (M = 4 x patch grid) for the N detections whose score
      reached ``min_score`` in :meth:`Backend.infer`; ``mask_index`` [N, 3] gives (b, c, k) of each.
      Only kept masks cross from the device: at 1008 a dense [8, 4, 50, 288, 288] block is 265 MB
      in bf16 (531 MB in float32).
    - ``mask_counts``: when the backend encoded the kept masks itself (resized to each frame's
      output size, thresholded at 0: runtime/mask_encode.py), their COCO run lengths, one array
      per ``mask_index`` row; ``masks`` is then [N, 0, 0] (no logits cross). None otherwise.
    """

    scores: F32
    boxes: F32
    presence: F32
    query_index: npt.NDArray[np.int64]
    masks: F32
    mask_index: npt.NDArray[np.int64]
    mask_counts: tuple[npt.NDArray[np.int64], ...] | None = None

    @property
    def batch(self) -> int:
        return int(self.scores.shape[0])


@runtime_checkable
class Backend(Protocol):
    """One per runtime. Not thread-safe: the GPU worker calls it from one thread."""

    @property
    def manifest(self) -> EngineManifest: ...

    def encode_text(self, prompts: list[str]) -> TextFeatures:
        """Run the text encoder once for the prompts (the result is cached by the caller)."""
        ...

    def infer(self, frames: npt.NDArray[np.uint8], text: TextFeatures, min_score: float) -> RawOutputs:
        """Run VE, GE and the decoder on ``frames`` [B, R, R, 3] uint8 RGB, B <= manifest.batch."""
        ...

    def close(self) -> None:
        """Release device memory and engine contexts."""
        ...
