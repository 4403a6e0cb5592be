"""`sam3stream bench` end to end on the CPU with the tiny random model: our backend and the
transformers peer measured in one run, written as JSON, a markdown table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

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
        assert row["attention_kernel"] is False  # no CUDA here
        peer = next(p for p in peers if p["cameras"] == cams)
        assert "error" not in peer and peer["total_fps"] > 0
        assert abs(row["speedup_vs_peer"] - row["total_fps"] / peer["total_fps"]) < 1e-9

    table = out.with_suffix(".md").read_text().splitlines()
    assert sum(line.startswith("| 448 |") for line in table) == 2
    assert out.with_suffix(".png").stat().st_size > 0
