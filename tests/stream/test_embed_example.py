"""examples/embed.py, run as its docstring says, on the fake backend."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.stream.helpers import camera_toml

ROOT = Path(__file__).resolve().parents[2]


def test_the_embedding_example_reports_detections_and_each_camera(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    config = tmp_path / "cams.toml"
    config.write_text(
        '[engines]\ndir = "engines/fake"\nbackend = "fake"\n\n[prompts]\nclasses = ["person"]\n\n'
        + camera_toml("bright", video("bright.mp4", frames=6))
        + camera_toml("gone", tmp_path / "gone.mp4")
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed.py"), str(config), "--fake", "--conf", "0.05"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # The fake model's scores follow the frames' gray levels, which rise from frame to frame.
    per_frame = [int(line.split(": ")[1].split()[0]) for line in lines if line.startswith("bright #")]
    assert per_frame and all(n >= 1 for n in per_frame)
    assert f"bright: ended, 6 frames, {sum(per_frame)} detections" in lines
    gone = tmp_path / "gone.mp4"
    assert f"gone: failed, 0 frames, 0 detections (cannot open: No such file or directory: {gone})" in lines
    assert "ERROR sam3stream.stream.source: camera_failed" in done.stderr  # through the app's logging
