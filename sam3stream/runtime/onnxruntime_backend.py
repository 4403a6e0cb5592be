"""The onnxruntime backend: runs an engine directory's ONNX graphs (CPU by default).

No torch here: this is the path `sam3stream infer` and the CPU demo take.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.config import DEVICE
from sam3stream.errors import BackendUnavailableError, EngineMismatchError, InputError
from sam3stream.runtime.contract import PAD_BOX_LABEL, check_frames
from sam3stream.runtime.manifest import EngineManifest, read_manifest
from sam3stream.runtime.select import select_masks
from sam3stream.runtime.tokenize import PromptTokenizer
from sam3stream.runtime.types import RawOutputs, TextFeatures

__all__ = ["OnnxRuntimeBackend"]

log = structlog.get_logger(__name__)


class OnnxRuntimeBackend:
    def __init__(self, engine_dir: Path, device: str = "cpu", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError("the onnxruntime backend needs `pip install onnxruntime`") from exc
        self.engine_dir = Path(engine_dir)
        self._manifest = read_manifest(self.engine_dir)
        if self._manifest.engine_kind != "onnx":
            raise EngineMismatchError(
                f"{engine_dir} holds {self._manifest.engine_kind} engines; "
                "the onnxruntime backend needs ONNX graphs"
            )
        providers: list[Any] = ["CPUExecutionProvider"]
        cuda_id = _cuda_device_id(device)
        if cuda_id is not None:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    f"device {device!r}: onnxruntime has no CUDA provider here; "
                    'install onnxruntime-gpu, or run on the CPU (engines.device = "cpu"; --device cpu)'
                )
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": cuda_id}))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self._sessions: dict[str, Any] = {}
        for name, graph in self._manifest.graphs.items():
            path = self.engine_dir / graph.file
            try:
                self._sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                raise EngineMismatchError(f"{path}: onnxruntime cannot load this graph ({exc})") from exc
        self._tokenizer = PromptTokenizer(self.engine_dir / self._manifest.tokenizer)
        self.last_timings: dict[str, float] = {}
        log.info("onnxruntime backend ready", engines=str(self.engine_dir), providers=providers)

    @property
    def manifest(self) -> EngineManifest:
        return self._manifest

    def encode_text(self, prompts: list[str]) -> TextFeatures:
        ids, mask = self._tokenizer.encode(prompts)
        (features,) = self._sessions["text"].run(None, {"input_ids": ids, "attention_mask": mask})
        return TextFeatures(
            prompts=tuple(prompts), features=features.astype(np.float32), mask=mask.astype(bool)
        )

    def infer(self, frames: npt.NDArray[np.uint8], text: TextFeatures, min_score: float) -> RawOutputs:
        check_frames(frames, self._manifest)
        batch = frames.shape[0]
        t0 = time.perf_counter()
        fpn0, fpn1, fpn2 = self._sessions["vision"].run(None, {"frames": np.ascontiguousarray(frames)})
        t1 = time.perf_counter()
        boxes = np.zeros((batch, 1, 4), np.float32)
        labels = np.full((batch, 1), PAD_BOX_LABEL, np.int64)
        geo, geo_mask = self._sessions["geometry"].run(
            None, {"fpn2": fpn2, "boxes": boxes, "box_labels": labels}
        )
        scores, out_boxes, masks, presence, query_index = self._sessions["decoder"].run(
            None,
            {
                "fpn0": fpn0,
                "fpn1": fpn1,
                "fpn2": fpn2,
                "text_features": text.features,
                "text_mask": text.mask,
                "geo_features": geo,
                "geo_mask": geo_mask,
            },
        )
        t2 = time.perf_counter()
        kept, index = select_masks(scores, masks, min_score)
        self.last_timings = {"vision": (t1 - t0) * 1e3, "decoder": (t2 - t1) * 1e3}
        return RawOutputs(
            scores=scores,
            boxes=out_boxes,
            presence=presence,
            query_index=query_index.astype(np.int64),
            masks=kept,
            mask_index=index,
        )

    def close(self) -> None:
        self._sessions.clear()


def _cuda_device_id(device: str) -> int | None:
    """None for "cpu", the GPU's index for "cuda" or "cuda:N"; anything else is an error."""
    if not DEVICE.match(device):
        raise InputError(f'device must be "cpu", "cuda" or "cuda:N", got {device!r}')
    return None if device == "cpu" else int(device.partition(":")[2] or 0)
