"""`sam3stream bench` end to end on the CPU with the tiny random model: our backend and the
transformers peer measured in one run, written as JSON, a markdown table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sam3stream.cli import main

ITERS, WARMUP = 2, 1


def test_bench_writes_both_measurements_and_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = ["bench", "--random", "tiny", "--resolution", "448", "--cameras", "2", "1"]
    argv += ["--classes", "2", "--device", "cpu", "--precision", "fp32", "--peer-iters", "1"]
    argv += ["--iters", str(ITERS), "--warmup", str(WARMUP), "--out", str(out)]
    assert main(argv) == 0

    result = json.loads(out.with_suffix(".json").read_text())
    ours, peers = result["ours"], result["peer"]
    assert [r["cameras"] for r in ours] == [1, 2]  # sorted, one row per camera count
    for row in ours:
        cams = row["cameras"]
        assert row["resolution"] == 448 and row["classes"] == 2
        assert row["frames"] >= cams * (ITERS + WARMUP)
        ms = row["batch_ms"]
        assert 0 < ms["p50"] <= ms["p95"]
        assert abs(row["total_fps"] - cams * 1e3 / ms["avg"]) < 1e-6 * row["total_fps"]
        assert row["attention_kernel"] is False and row["overlap"] is False  # no CUDA here
        # Both on a backend for 2 frames, each stepping its vision as a service with that many cameras.
        assert row["engine_batch"] == 2 and row["vision_chunk"] == cams
        peer = next(p for p in peers if p["cameras"] == cams)
        assert "error" not in peer and peer["total_fps"] > 0
        # Each row names where it was measured, so that merged tables cannot hide a mix.
        assert (row["device"], row["torch"]) == (peer["device"], peer["torch"]) == ("cpu", torch.__version__)
        assert abs(row["speedup_vs_peer"] - row["total_fps"] / peer["total_fps"]) < 1e-9

    assert result["complete"] is True
    table = out.with_suffix(".md").read_text().splitlines()
    assert sum(line.startswith("| 448 |") for line in table) == 2
    assert table[-1] == f"Measured on: cpu (torch {torch.__version__})."
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_run_stopped_part_way_keeps_the_rows_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full-size bench takes minutes per resolution: when it is stopped (Ctrl-C, a time
    limit), the resolutions already measured are on disk, marked incomplete."""
    import sam3stream.bench as bench

    def one_resolution(kind: str, args: bench.BenchArgs, resolution: int) -> list[dict[str, Any]]:
        if resolution == 560:
            raise KeyboardInterrupt
        ms = {"avg": 20.0, "p50": 19.0, "p95": 25.0, "min": 18.0, "n": 3.0}
        return [
            {
                "kind": kind,
                "resolution": resolution,
                "cameras": 1,
                "batch_ms": ms,
                "frame_ms": 20.0,
                "fps_per_camera": 50.0,
                "total_fps": 50.0,
                "alloc_peak_mib": 100.0,
                "buffer_mib": 10.0,
                "frames": 3,
            }
        ]

    monkeypatch.setattr(bench, "_child", one_resolution)
    out = tmp_path / "stopped"
    out.with_suffix(".png").write_bytes(b"an earlier run's plot")
    argv = ["bench", "--random", "tiny", "--resolution", "672", "840", "560", "--cameras", "1"]
    assert main([*argv, "--no-peer", "--device", "cpu", "--out", str(out)]) != 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["complete"] is False
    assert [row["resolution"] for row in result["ours"]] == [672, 840]
    table = out.with_suffix(".md").read_text()
    assert "Incomplete" in table and "| 840 | 1 |" in table
    assert not out.with_suffix(".png").exists()  # not left beside rows it does not show


def test_an_engine_directory_is_benched_as_the_service_would_size_it(
    tiny_engines: Path, tmp_path: Path
) -> None:
    """A batch-4 engine benched for one camera steps one frame at a time, as `sam3stream run`
    does for one camera, rather than padding a chunk of 4."""
    out = tmp_path / "engines"
    argv = ["bench", "--engines", str(tiny_engines), "--backend", "torch", "--device", "cpu"]
    argv += ["--precision", "fp32", "--cameras", "1", "--classes", "2", "--iters", "1", "--warmup", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["ours"]
    assert row["resolution"] == 490 and row["cameras"] == 1
    assert row["vision_chunk"] == 1


@pytest.mark.parametrize(
    ("resolution", "cameras", "groups"),
    [
        (1008, [1, 8], [[1, 8]]),  # chunk 1 for both: one backend
        (840, [1, 8], [[1], [8]]),  # chunk 1 for one camera, 2 for eight
        (560, [8, 1, 2, 4], [[1], [2], [4, 8]]),
    ],
)
def test_camera_counts_that_the_service_would_chunk_differently_get_their_own_backend(
    resolution: int, cameras: list[int], groups: list[list[int]]
) -> None:
    from sam3stream.bench import BenchArgs, camera_groups

    args = BenchArgs(resolutions=[resolution], cameras=cameras)
    assert camera_groups(args, resolution, engine_batch=8) == groups
    pinned = BenchArgs(resolutions=[resolution], cameras=cameras, vision_chunk=2)
    assert camera_groups(pinned, resolution, engine_batch=8) == [sorted(cameras)]
    other = BenchArgs(resolutions=[resolution], cameras=cameras, backend="onnxruntime")
    assert camera_groups(other, resolution, engine_batch=8) == [sorted(cameras)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cameras", "0"], "--cameras must be >= 1, got 0"),
        (
            ["--cameras", "1", "4", "--max-batch", "2"],
            "--cameras 4: --max-batch is at most 2 frames per batch",
        ),
        (["--classes", "13"], "--classes must be <= 12"),
        (["--iters", "0"], "--iters must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--vision-chunk", "0"], "--vision-chunk must be >= 1, got 0"),
        # Options that cannot be measured are refused before anything runs, too.
        (["--backend", "onnxruntime"], "--backend onnxruntime runs an engine directory: pass --engines DIR"),
        (["--backend", "tensorrt"], "(made by sam3stream build DIR)"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_bad_options_name_their_flag_and_write_nothing(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--random", "tiny", "--resolution", "448", "--device", "cpu", "--no-peer"]
    assert main([*argv, *extra, "--out", str(tmp_path / "b")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()
    assert not list(tmp_path.iterdir())


def test_an_engine_directory_fixes_the_batch(
    tiny_engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--engines", str(tiny_engines), "--device", "cpu", "--out", str(tmp_path / "b")]
    assert main([*argv, "--cameras", "5"]) == 1
    assert f"--cameras 5: {tiny_engines} takes at most 4 frames per batch" in capsys.readouterr().err
    assert main([*argv, "--max-batch", "8"]) == 1
    assert "--max-batch applies to --random" in capsys.readouterr().err
    assert main([*argv, "--compile-cache", str(tmp_path / "c")]) == 1
    assert "--compile-cache applies to --random; runs of" in capsys.readouterr().err


def test_max_batch_builds_the_backend_a_service_with_that_max_batch_would(tmp_path: Path) -> None:
    out = tmp_path / "one_of_two"
    argv = ["bench", "--random", "tiny", "--resolution", "448", "--cameras", "1", "--max-batch", "2"]
    argv += [
        "--classes",
        "2",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--no-peer",
        "--iters",
        "1",
        "--warmup",
        "1",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["ours"]
    assert (row["cameras"], row["engine_batch"], row["vision_chunk"]) == (1, 2, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default --device cuda works here")
def test_a_bench_on_cuda_without_a_gpu_fails_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --device cpu on a machine without CUDA, each measurement says what to change
    (not a traceback from its child process), the command fails, and the results of an earlier
    run at the same --out are left as they were."""
    out = tmp_path / "nogpu"
    earlier = '{"ours": [{"resolution": 448}]}\n'
    out.with_suffix(".json").write_text(earlier)
    argv = ["bench", "--random", "tiny", "--resolution", "448", "--cameras", "1", "--out", str(out)]
    assert main(argv) == 1
    printed = capsys.readouterr()
    assert "--device cuda: torch" in printed.out and "sees no CUDA device" in printed.out
    assert "--device cpu" in printed.out  # in the table's error rows
    assert "nothing measured" in printed.err
    assert out.with_suffix(".json").read_text() == earlier


def test_an_engine_directory_is_not_measured_at_another_resolution(
    tiny_engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--engines", str(tiny_engines), "--device", "cpu", "--out", str(tmp_path / "b")]
    assert main([*argv, "--resolution", "490", "560"]) == 1
    assert f"--resolution 490 560: {tiny_engines} runs at 490 only" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["bench", "--random", "tiny", "--resolution", "448", "--device", "cpu", "--no-peer"]
    assert main([*argv, "--out", str(blocker / "b")]) == 1
    assert f"--out {blocker / 'b'}: cannot write in {blocker}" in capsys.readouterr().err


def test_out_is_a_stem_whose_dots_are_kept() -> None:
    from sam3stream.bench import output_path

    assert output_path(Path("d/run"), ".md") == Path("d/run.md")
    assert output_path(Path("d/run.json"), ".png") == Path("d/run.png")  # our own suffix: replaced
    assert output_path(Path("d/h200.v2"), ".json") == Path("d/h200.v2.json")  # not ours: kept
