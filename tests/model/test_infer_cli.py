"""`sam3stream infer`: JSON + PNG per image, clear errors, and no torch on the onnxruntime path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3stream.cli import main
from sam3stream.rle import decode
from sam3stream.stream.frames import Rle


def _image(path: Path, size: tuple[int, int] = (160, 120)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_writes_detections_and_annotated_images(
    tiny_engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.jpg", (90, 200))
    out = tmp_path / "out"
    code = main(
        [
            "infer",
            "--engines",
            str(tiny_engines),
            "--image",
            str(a),
            "--image",
            str(b),
            "--prompt",
            "person",
            "--prompt",
            "hand",
            "--conf",
            "0.2",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "timing (ms):" in printed and "vision=" in printed and "decoder=" in printed
    # Results only on stdout (a script can read them); info logs are not shown at all.
    assert printed.splitlines()[0].startswith(f"{a} (160x120): ")
    assert "backend ready" not in captured.out + captured.err
    result = json.loads((out / "b.json").read_text())
    assert (result["width"], result["height"]) == (90, 200)
    det = result["detections"][0]
    assert det["label"] in ("person", "hand") and det["score"] >= 0.2
    assert det["box_px"] == pytest.approx(
        [v * s for v, s in zip(det["box"], (90, 200, 90, 200), strict=True)]
    )
    mask = decode(Rle(size=tuple(det["mask"]["size"]), counts=det["mask"]["counts"]))
    assert mask.shape == (200, 90)
    assert Image.open(out / "a.png").size == (160, 120)


def test_bad_inputs_are_one_line_errors(
    tiny_engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["infer", "--engines", str(tiny_engines), "--image", str(bad), "--prompt", "x"]) == 1
    assert f"image {bad} cannot be read" in capsys.readouterr().err
    good = _image(tmp_path / "a.png")
    assert main(["infer", "--engines", str(tiny_engines), "--image", str(good), "--prompt", " "]) == 1
    assert "non-empty prompt" in capsys.readouterr().err
    assert main(["infer", "--engines", str(tmp_path / "none"), "--image", str(good), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bad_options_are_one_line_errors_before_anything_loads(
    tiny_engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _image(tmp_path / "a.png")
    base = ["infer", "--engines", str(tiny_engines), "--image", str(image)]
    assert main([*base, "--prompt", "x", "--conf", "2"]) == 1
    assert "--conf must be between 0 and 1, got 2.0" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--prompt", "x"]) == 1
    assert "--prompt 'x' given more than once" in capsys.readouterr().err
    assert main([*base, "--prompt", "x", "--device", "gpu"]) == 1
    assert "--device must be cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    # An onnxruntime without its CUDA provider (this CPU build) says so rather than run on the CPU.
    assert main([*base, "--prompt", "x", "--device", "cuda"]) == 1
    assert "device 'cuda': onnxruntime has no CUDA provider here" in capsys.readouterr().err


def test_outputs_never_overwrite_each_other_or_an_input(
    tiny_engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x").mkdir()
    images = [
        _image(tmp_path / "a.png"),
        _image(tmp_path / "x" / "a.png", (90, 200)),
        _image(tmp_path / "a.jpg"),
    ]
    out = tmp_path / "out"
    args = [
        "infer",
        "--engines",
        str(tiny_engines),
        "--prompt",
        "person",
        "--conf",
        "0.2",
        "--output",
        str(out),
    ]
    assert main([*args, *(a for i in images for a in ("--image", str(i)))]) == 0
    assert "wrote 6 files" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "a-2.json",
        "a-2.png",
        "a-3.json",
        "a-3.png",
        "a.json",
        "a.png",
    ]
    assert json.loads((out / "a-2.json").read_text())["image"] == str(images[1])
    before = images[0].read_bytes()
    assert main([*args[:-1], str(tmp_path), "--image", str(images[0])]) == 1
    assert f"would overwrite the input image {images[0]}" in capsys.readouterr().err
    assert images[0].read_bytes() == before


def test_long_prompts_are_truncated_and_said_so(tiny_engines: Path, tmp_path: Path) -> None:
    good = _image(tmp_path / "a.png")
    long_prompt = " ".join(["word"] * 40)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam3stream",
            "infer",
            "--engines",
            str(tiny_engines),
            "--image",
            str(good),
            "--prompt",
            long_prompt,
            "--output",
            str(tmp_path / "o"),
            "--no-draw",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "truncated" in proc.stdout + proc.stderr


def test_onnxruntime_path_runs_without_torch(tiny_engines: Path, tmp_path: Path) -> None:
    good = _image(tmp_path / "a.png")
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from sam3stream.cli import main\n"
        f"sys.exit(main(['infer', '--engines', {str(tiny_engines)!r}, '--image', {str(good)!r},"
        f" '--prompt', 'person', '--output', {str(tmp_path / 'o')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "a.json").is_file()
