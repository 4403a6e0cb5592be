"""Shared tiny-model fixtures: built once per test session (building takes seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sam3stream.model.roi_align import install_into_transformers  # noqa: E402

install_into_transformers()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny checkpoint written to disk in the facebook/sam3 layout."""
    from sam3stream.model.checkpoint import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONNX engines exported from the tiny checkpoint at 490 (a grid of 35: window padding)."""
    from sam3stream.model.export import export_engines

    root = tmp_path_factory.mktemp("engines")
    return export_engines(
        checkpoint=tiny_checkpoint, resolution=490, batch=4, queries=20, out=root / "b4_q20_r490"
    )
