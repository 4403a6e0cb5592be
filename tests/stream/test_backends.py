"""The fake backend keeps the Backend contract; the loader picks backends lazily."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sam3stream.errors import BackendUnavailableError
from sam3stream.runtime.fake import FakeBackend, FakeEngineError
from sam3stream.runtime.loader import open_backend
from sam3stream.runtime.manifest import write_manifest
from sam3stream.runtime.types import Backend


def test_fake_backend_follows_the_protocol_and_is_deterministic() -> None:
    backend = FakeBackend(resolution=448, queries=3)
    assert isinstance(backend, Backend)
    text = backend.encode_text(["person", "hand"])
    assert text.features.shape[:2] == (2, 32) and text.mask.shape == (2, 32)
    frames = np.stack([np.full((448, 448, 3), v, np.uint8) for v in (51, 204)])
    out = backend.infer(frames, text, min_score=0.5)
    assert out.scores.shape == (2, 2, 3) and out.boxes.shape == (2, 2, 3, 4)
    assert out.presence.shape == (2, 2) and out.query_index.shape == (2, 2, 3)
    assert out.scores[1, 0, 0] == pytest.approx(0.8) and out.scores[0, 0, 0] == pytest.approx(0.2)
    # Only rows at or above min_score carry masks, at the manifest's mask size.
    assert out.mask_index.tolist() == [[1, 0, 0], [1, 1, 0]]
    assert out.masks.shape == (2, backend.manifest.mask_size, backend.manifest.mask_size)
    again = backend.infer(frames, text, min_score=0.5)
    assert np.array_equal(again.scores, out.scores)
    assert set(backend.last_timings) == {"vision", "decoder"}


def test_fake_backend_fails_when_told() -> None:
    backend = FakeBackend(fail_after=1)
    text = backend.encode_text(["a"])
    frames = np.zeros((1, 448, 448, 3), np.uint8)
    backend.infer(frames, text, 0.3)
    with pytest.raises(FakeEngineError):
        backend.infer(frames, text, 0.3)


def test_loader_opens_the_fake_with_a_manifest_shape(tmp_path: Path) -> None:
    write_manifest(tmp_path, FakeBackend(resolution=560, batch=4, queries=7).manifest)
    backend = open_backend("fake", tmp_path)
    assert (backend.manifest.resolution, backend.manifest.batch, backend.manifest.queries) == (560, 4, 7)
    assert open_backend("fake", tmp_path / "absent").manifest.resolution == 448


def test_loader_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="unknown backend 'cuda'"):
        open_backend("cuda", tmp_path)
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        open_backend("tensorrt", tmp_path, device="cuda")


def test_fake_json_sets_delay_and_failure(tmp_path: Path) -> None:
    (tmp_path / "fake.json").write_text('{"delay_s": 0.01, "fail_after": 2, "batch": 16}')
    backend = open_backend("fake", tmp_path)
    assert isinstance(backend, FakeBackend)
    assert (backend.delay_s, backend.fail_after, backend.manifest.batch) == (0.01, 2, 16)


def test_loader_passes_device_and_precision_to_backends_that_take_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[dict[str, object]] = []

    class TorchBackend:
        def __init__(self, engine_dir: Path, device: str = "cpu", precision: str = "bf16") -> None:
            made.append({"dir": engine_dir, "device": device, "precision": precision})

    module = types.ModuleType("sam3stream.runtime.torch_backend")
    module.TorchBackend = TorchBackend  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sam3stream.runtime.torch_backend", module)
    open_backend("torch", tmp_path, device="cuda:1", precision="fp16")
    assert made == [{"dir": tmp_path, "device": "cuda:1", "precision": "fp16"}]


def test_loader_passes_the_torch_settings_inside_torch_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[object] = []

    @dataclasses.dataclass
    class TorchOptions:
        precision: str = "bf16"
        compile: bool = True
        overlap: bool = False
        fused_gelu: bool | None = None
        typical_batch: int | None = None
        compile_cache: str | None = None

    class TorchBackend:
        def __init__(
            self, engine_dir: Path, device: str = "cuda", options: TorchOptions | None = None
        ) -> None:
            made.append(options)

    module = types.ModuleType("sam3stream.runtime.torch_backend")
    module.TorchBackend = TorchBackend  # type: ignore[attr-defined]
    module.TorchOptions = TorchOptions  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sam3stream.runtime.torch_backend", module)
    open_backend("torch", tmp_path, device="cuda", precision="fp16")
    open_backend("torch", tmp_path, device="cuda", overlap=True, fused_gelu=True, typical_batch=3)
    open_backend("torch", tmp_path, device="cuda", compile_cache=True)
    assert made == [
        TorchOptions(precision="fp16"),
        TorchOptions(overlap=True, fused_gelu=True, typical_batch=3),
        TorchOptions(compile_cache=str(tmp_path / "compile-cache")),
    ]
