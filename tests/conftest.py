"""Fixtures shared across the test tree (keep this small; area helpers live next to their tests)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from tests.stream.videos import make_video


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU, Triton kernels run in Triton's interpreter (tests/runtime/test_attention_kernel.py).
# Triton reads the switch when it is first imported, and torch._dynamo imports it, so it is set
# here, before any test module loads.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def video(tmp_path: Path) -> Callable[..., Path]:
    """``video("a.mp4", frames=12, ...)``: a small gray-level test video in tmp_path."""

    def make(name: str = "cam.mp4", frames: int = 12, **kwargs: object) -> Path:
        return make_video(tmp_path / name, frames, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """A test that runs the CLI in-process configures logging for the process (warnings only);
    the next test starts from structlog's defaults again."""
    yield
    structlog.reset_defaults()
