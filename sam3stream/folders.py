"""Output folders given by a user (bench's --out, the file sinks' folders): made and checked
before any slow work, so that a bad one fails at once rather than after it."""

from __future__ import annotations

import tempfile
from pathlib import Path

__all__ = ["make_writable_folder"]


def make_writable_folder(folder: Path) -> None:
    """Make ``folder`` (and its parents) and check that it takes a file; raises the OSError."""
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()
