"""Resolution planning from benchmark rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sam3stream.errors import InputError
from sam3stream.plan import BUNDLED, default_bench, load_bench, plan


def _row(res: int, cams: int, fps: float, mib: float) -> dict[str, float]:
    return {
        "resolution": res,
        "cameras": cams,
        "total_fps": fps,
        "nvml_peak_mib": mib,
        "alloc_peak_mib": mib / 2,
    }


BENCH = {
    "ours": [
        _row(1008, 8, 32.0, 9000),
        _row(840, 8, 45.0, 7000),
        _row(672, 8, 70.0, 4800),
        _row(560, 8, 85.0, 4000),
        _row(560, 1, 34.0, 3900),
    ]
}


def test_highest_resolution_that_fits_memory_and_fps_wins() -> None:
    cands = plan(BENCH, vram_gib=8, cameras=8, min_fps_per_camera=5)
    fits = [c.resolution for c in cands if c.fits]
    assert fits == [672, 560]
    assert "MiB usable" in next(c for c in cands if c.resolution == 1008).problems[0]


def test_small_objects_rule_out_low_resolutions_and_speed_ratio_scales_fps() -> None:
    cands = plan(BENCH, vram_gib=32, cameras=8, objects="small", speed_ratio=0.5, min_fps_per_camera=2.5)
    by_res = {c.resolution: c for c in cands}
    assert by_res[840].fits and by_res[840].fps_per_camera == pytest.approx(45.0 * 0.5 / 8)
    assert not by_res[1008].fits  # 2.0 FPS per camera at half speed
    assert any("small objects" in p for p in by_res[672].problems)


def test_fewer_cameras_use_the_row_measured_with_at_least_that_many() -> None:
    cand = next(c for c in plan(BENCH, vram_gib=8, cameras=1) if c.resolution == 560)
    assert cand.measured_cameras == 1 and cand.fps_per_camera == pytest.approx(34.0)


def test_bundled_measurements_load_and_bad_files_are_named(tmp_path: Path) -> None:
    assert {r["resolution"] for r in default_bench()["ours"]} >= {560, 672, 840, 1008}
    with pytest.raises(InputError, match="does not exist"):
        load_bench(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(InputError, match="no 'ours' rows"):
        load_bench(bad)
    with pytest.raises(InputError, match="--objects"):
        plan(BENCH, vram_gib=8, cameras=8, objects="medium")
    for content, message in (
        ([], "no 'ours' rows"),
        ({"ours": [{"resolution": 1008, "error": "out of memory"}]}, "no measured rows"),
        (
            {"ours": [{"resolution": 1008, "cameras": 8, "total_fps": 9.0}]},
            "row 0 lacks nvml_peak_mib or alloc",
        ),
    ):
        bad.write_text(json.dumps(content))
        with pytest.raises(InputError, match=message):
            load_bench(bad)
    for headroom in (1.5, -0.1):
        with pytest.raises(InputError, match=r"--headroom .* from 0 up to 1"):
            plan(BENCH, vram_gib=8, cameras=8, headroom=headroom)


def test_each_bundled_card_is_planned_from_its_own_table(capsys: pytest.CaptureFixture[str]) -> None:
    from sam3stream.cli import main

    argv = ["plan", "--vram-gb", "8", "--cameras", "8"]
    for card in BUNDLED:
        table = default_bench(card)
        at_1008 = next(r for r in table["ours"] if (r["resolution"], r["cameras"]) == (1008, 8))
        assert main([*argv, "--measured-on", card]) == 0
        out = capsys.readouterr().out
        # The card named: by the rows' own GPU name where they record it, else by the table's.
        first = out.splitlines()[0]
        assert first.startswith("measured on: ") and card.upper() in first
        row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["1008"])
        assert row[1:3] == [f"{at_1008['nvml_peak_mib']:.0f}", f"{at_1008['total_fps'] / 8:.1f}"]
    # Two tables of two cards, not one file twice.
    assert default_bench("h100")["ours"] != default_bench("h200")["ours"]
    with pytest.raises(InputError, match="h200, h100"):
        default_bench("a100")
    with pytest.raises(SystemExit):  # one source of measurements at a time
        main([*argv, "--measured-on", "h100", "--bench", "x.json"])


def test_a_bench_file_that_names_its_device_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sam3stream.cli import main

    rows = [{**r, "device": "NVIDIA L4", "torch": "2.11.0"} for r in BENCH["ours"]]
    path = tmp_path / "l4.json"
    path.write_text(json.dumps({"ours": rows, "peer": []}))
    main(["plan", "--vram-gb", "24", "--bench", str(path)])
    assert capsys.readouterr().out.splitlines()[0] == "measured on: NVIDIA L4 (torch 2.11.0)"


def test_a_cpu_bench_without_gpu_memory_is_refused(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"ours": [{**_row(560, 1, 2.0, 0.0), "alloc_peak_mib": 0.0}]}))
    with pytest.raises(InputError, match=r"row 0 has no GPU memory figure .* on a GPU"):
        load_bench(cpu)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vram_gib": float("nan")}, "--vram-gb must be a number > 0, got nan"),
        ({"vram_gib": 0.0}, "--vram-gb must be a number > 0, got 0"),
        ({"speed_ratio": 0.0}, "--speed-ratio must be a number > 0, got 0"),
        ({"min_fps_per_camera": float("inf")}, "--min-fps must be a number >= 0, got inf"),
        ({"cameras": 0}, "--cameras must be >= 1, got 0"),
    ],
)
def test_each_bad_flag_is_named(kwargs: dict[str, float], message: str) -> None:
    args = {"vram_gib": 8.0, "cameras": 8, **kwargs}
    with pytest.raises(InputError) as info:
        plan(BENCH, **args)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_the_plan_says_which_row_each_line_comes_from_and_why_it_recommends(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sam3stream.cli import main

    stopped = tmp_path / "stopped.json"
    stopped.write_text(json.dumps({**BENCH, "complete": False}))
    assert main(["plan", "--bench", str(stopped), "--vram-gb", "8", "--cameras", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "note: an incomplete run (stopped part way): only the resolutions it measured"
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["560"], ["672"])}
    assert rows["560"][3:5] == ["1", "cam"] and rows["672"][3:5] == ["8", "cam"]
    assert lines[-1].startswith("recommended: 672, the highest resolution that fits 1 camera (")
