"""Fixtures shared across the test tree (keep this small; area helpers live next to their tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.stream.videos import make_video


@pytest.fixture
def video(tmp_path: Path) -> Callable[..., Path]:
    """``video("a.mp4", frames=12, ...)``: a small gray-level test video in tmp_path."""

    def make(name: str = "cam.mp4", frames: int = 12, **kwargs: object) -> Path:
        return make_video(tmp_path / name, frames, **kwargs)  # type: ignore[arg-type]

    return make
