"""tools/merge_bench.py: several bench results into one report, a later row replacing an
earlier one for the same resolution and camera count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.tool_modules import load_tool


def row(resolution: int, cameras: int, fps: float, kind: str = "ours") -> dict[str, Any]:
    return {"kind": kind, "resolution": resolution, "cameras": cameras, "total_fps": fps}


def test_a_later_file_replaces_rows_for_the_same_resolution_and_cameras(tmp_path: Path) -> None:
    first, second = tmp_path / "eight.json", tmp_path / "one.json"
    first.write_text(
        json.dumps(
            {
                "command": "bench a",
                "ours": [row(1008, 1, 50.0), row(1008, 8, 52.7), row(560, 1, 50.1), row(560, 8, 141.7)],
                "peer": [row(560, 8, 38.6, "peer")],
            }
        )
    )
    second.write_text(json.dumps({"command": "bench b", "ours": [row(560, 1, 104.0)], "peer": []}))
    merged = load_tool("merge_bench").merge([first, second])
    got = [(r["resolution"], r["cameras"], r["total_fps"]) for r in merged["ours"]]
    assert got == [(1008, 1, 50.0), (1008, 8, 52.7), (560, 1, 104.0), (560, 8, 141.7)]
    assert merged["replaced"] == [f"ours 560 x 1: {first} -> {second}"]
    assert merged["commands"] == ["bench a", "bench b"]
    assert [r["total_fps"] for r in merged["peer"]] == [38.6]


def test_rows_of_different_devices_are_merged_only_when_asked(tmp_path: Path) -> None:
    gpu, cpu = tmp_path / "gpu.json", tmp_path / "cpu.json"
    on = {"device": "NVIDIA H200", "torch": "2.11.0"}
    gpu.write_text(json.dumps({"ours": [{**row(560, 1, 104.0), **on}], "peer": []}))
    cpu.write_text(json.dumps({"ours": [{**row(560, 1, 2.0), "device": "cpu", "torch": "2.13.0"}]}))
    tool = load_tool("merge_bench")
    with pytest.raises(tool.MergeError, match=r"different devices .*cpu \(torch 2\.13\.0\): .*cpu\.json"):
        tool.merge([gpu, cpu])
    assert tool.merge([gpu, cpu], mixed=True)["ours"][0]["total_fps"] == 2.0
    with pytest.raises(tool.MergeError, match=r"missing\.json"):
        tool.merge([gpu, tmp_path / "missing.json"])
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(tool.MergeError, match="not a `sam3stream bench` result"):
        tool.merge([tmp_path / "list.json"])
