"""A backend without a model, for tests and for trying the stream half on any machine.

Outputs are a pure function of the pixels: each frame gets, for every class, a
centred square box whose side is the frame's mean brightness, scored by that
same brightness (slightly less for each later class). A configurable sleep
stands in for GPU time, and ``fail_after`` makes the engine die on a given call.
"""

from __future__ import annotations

import threading
import time
import zlib
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from sam3stream import __version__
from sam3stream.runtime.manifest import (
    GRAPH_NAMES,
    MANIFEST_NAME,
    EngineManifest,
    GraphSpec,
    ModelSpec,
)
from sam3stream.runtime.types import RawOutputs, TextFeatures

__all__ = ["FakeBackend", "FakeEngineError", "FakeSettings", "fake_manifest"]

TEXT_CONTEXT = 32
HIDDEN = 16  # small: nothing reads the features but the fake itself


class FakeEngineError(RuntimeError):
    """What the fake raises when told to fail (stands in for a CUDA error)."""


def fake_manifest(resolution: int = 448, batch: int = 8, queries: int = 4) -> EngineManifest:
    return EngineManifest(
        resolution=resolution,
        batch=batch,
        queries=queries,
        precision="float32",
        model=ModelSpec(
            source="fake",
            checkpoint_sha256="0" * 64,
            hidden_size=256,
            text_context=TEXT_CONTEXT,
            num_queries=200,
        ),
        graphs={name: GraphSpec(file=f"{name}.onnx", inputs=[], outputs=[]) for name in GRAPH_NAMES},
        tokenizer="tokenizer",
        versions={"sam3stream": __version__},
        created="1970-01-01T00:00:00Z",
        engine_kind="fake",
    )


class FakeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    resolution: int = 448
    batch: int = 8
    queries: int = 4
    delay_s: float = 0.0
    fail_after: int | None = None
    load_s: float = 0.0  # how long opening the directory takes (a slow engine load)


class FakeBackend:
    """Implements :class:`sam3stream.runtime.types.Backend` with arithmetic instead of a model."""

    def __init__(
        self,
        *,
        resolution: int = 448,
        batch: int = 8,
        queries: int = 4,
        delay_s: float = 0.0,
        fail_after: int | None = None,
    ) -> None:
        self._manifest = fake_manifest(resolution, batch, queries)
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.closed = False
        self.last_timings: dict[str, float] = {}
        self._threads: set[int] = set()  # which threads called infer: the worker promises exactly one
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, engine_dir: Path) -> FakeBackend:
        """Shapes from ``engine_dir/manifest.json``, behaviour from ``engine_dir/fake.json``.

        Either file may be missing (then the defaults hold). ``fake.json`` holds any of
        ``resolution``, ``batch``, ``queries``, ``delay_s``, ``fail_after`` and ``load_s``, so
        that a config run from the command line can simulate a slow, dying or slow-to-load engine.
        """
        settings = FakeSettings()
        manifest_path = Path(engine_dir) / MANIFEST_NAME
        if manifest_path.is_file():
            # Only the shapes matter here: the graph files need not exist.
            m = msgspec.json.decode(manifest_path.read_bytes(), type=EngineManifest)
            settings = FakeSettings(resolution=m.resolution, batch=m.batch, queries=m.queries)
        fake_path = Path(engine_dir) / "fake.json"
        if fake_path.is_file():
            overrides = msgspec.json.decode(fake_path.read_bytes(), type=dict[str, object])
            settings = msgspec.convert({**msgspec.structs.asdict(settings), **overrides}, FakeSettings)
        if settings.load_s > 0:
            time.sleep(settings.load_s)
        return cls(
            resolution=settings.resolution,
            batch=settings.batch,
            queries=settings.queries,
            delay_s=settings.delay_s,
            fail_after=settings.fail_after,
        )

    @property
    def manifest(self) -> EngineManifest:
        return self._manifest

    @property
    def infer_threads(self) -> int:
        return len(self._threads)

    def encode_text(self, prompts: list[str]) -> TextFeatures:
        rows = []
        for prompt in prompts:
            rng = np.random.default_rng(zlib.crc32(prompt.encode("utf-8")))
            rows.append(rng.standard_normal((TEXT_CONTEXT, HIDDEN), dtype=np.float32))
        features = np.stack(rows) if rows else np.zeros((0, TEXT_CONTEXT, HIDDEN), np.float32)
        mask = np.zeros((len(prompts), TEXT_CONTEXT), dtype=np.bool_)
        mask[:, :4] = True
        return TextFeatures(prompts=tuple(prompts), features=features, mask=mask)

    def infer(self, frames: npt.NDArray[np.uint8], text: TextFeatures, min_score: float) -> RawOutputs:
        with self._lock:
            self._threads.add(threading.get_ident())
            self.calls += 1
            calls = self.calls
        r = self._manifest.resolution
        if frames.ndim != 4 or frames.shape[1:] != (r, r, 3) or frames.dtype != np.uint8:
            raise ValueError(f"expected frames [B, {r}, {r}, 3] uint8, got {frames.shape} {frames.dtype}")
        if not 1 <= frames.shape[0] <= self._manifest.batch:
            raise ValueError(f"batch {frames.shape[0]} outside 1..{self._manifest.batch}")
        if self.fail_after is not None and calls > self.fail_after:
            raise FakeEngineError(f"fake engine failure on call {calls}")
        start = time.perf_counter()
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        self.batch_sizes.append(int(frames.shape[0]))
        out = self._outputs(frames, text.num_classes, min_score)
        total_ms = (time.perf_counter() - start) * 1000
        self.last_timings = {"vision": total_ms * 0.8, "decoder": total_ms * 0.2}
        return out

    def _outputs(self, frames: npt.NDArray[np.uint8], classes: int, min_score: float) -> RawOutputs:
        b, k, m = frames.shape[0], self._manifest.queries, self._manifest.mask_size
        brightness = frames.reshape(b, -1).mean(axis=1, dtype=np.float64).astype(np.float32) / 255.0
        class_scale = (1.0 - 0.1 * np.arange(classes, dtype=np.float32)).clip(0.05, 1.0)
        query_scale = 0.5 ** np.arange(k, dtype=np.float32)
        scores = brightness[:, None, None] * class_scale[None, :, None] * query_scale[None, None, :]
        half = (brightness / 2).clip(0.05, 0.5)
        box = np.stack([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], axis=-1)
        boxes = np.broadcast_to(box[:, None, None, :], (b, classes, k, 4)).astype(np.float32)
        presence = np.ascontiguousarray(scores[:, :, 0]) if k else np.zeros((b, classes), np.float32)
        query_index = np.broadcast_to(np.arange(k, dtype=np.int64), (b, classes, k)).copy()
        keep = np.argwhere(scores >= min_score).astype(np.int64)
        masks = np.full((len(keep), m, m), -10.0, dtype=np.float32)
        for n, (bi, _ci, _ki) in enumerate(keep):
            lo, hi = int(box[bi, 0] * m), max(int(box[bi, 2] * m), int(box[bi, 0] * m) + 1)
            masks[n, lo:hi, lo:hi] = 10.0
        return RawOutputs(
            scores=scores.astype(np.float32),
            boxes=boxes,
            presence=presence,
            query_index=query_index,
            masks=masks,
            mask_index=keep.reshape(-1, 3),
        )

    def close(self) -> None:
        self.closed = True
