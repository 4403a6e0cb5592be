"""`sam3stream demo`: synthetic clips, its config, and one end-to-end run on exported engines."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import msgspec
import numpy as np
import pytest

from sam3stream.commands.demo import parse_host_port
from sam3stream.config import JsonlSinkConfig, MqttSinkConfig, VideoSinkConfig
from sam3stream.demo.clips import ClipSpec, Shape, ensure_clips, render_frames, write_clip
from sam3stream.demo.config import PROMPTS, DemoLayout, assign_clips, demo_config_text, write_demo_config
from sam3stream.demo.run import RunOutcome
from sam3stream.demo.summary import SummaryContext, format_summary
from sam3stream.errors import InputError
from sam3stream.runtime.manifest import EngineManifest, ModelSpec
from sam3stream.stream.frames import FrameResult

SMALL = ClipSpec("small", "coffee", seed=7, width=160, height=96, fps=10, seconds=1.2)


def decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# --------------------------------------------------------------------------- clips


def test_clip_is_a_decodable_mp4_of_the_right_size_and_length(tmp_path: Path) -> None:
    path = write_clip(SMALL, tmp_path / "small.mp4")
    frames = decode(path)
    assert len(frames) == SMALL.frames == 12
    assert all(f.shape == (96, 160, 3) for f in frames)
    assert [p.name for p in tmp_path.iterdir()] == ["small.mp4"]  # the partial file was renamed


def test_clip_content_moves_over_a_photo(tmp_path: Path) -> None:
    frames = [f.astype(np.int16) for f in decode(write_clip(SMALL, tmp_path / "small.mp4"))]
    # Every frame differs from the one before it (the shapes move), well beyond codec noise.
    steps = [float(np.abs(b - a).mean()) for a, b in itertools.pairwise(frames)]
    assert min(steps) > 0.5, steps
    # The background is a photo, not a flat colour.
    assert frames[0].std() > 20


def test_clips_are_deterministic_per_seed() -> None:
    first = list(render_frames(SMALL))
    again = list(render_frames(SMALL))
    other = list(render_frames(dataclasses.replace(SMALL, seed=8)))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[5], other[5])


def test_shapes_bounce_and_stay_inside() -> None:
    shape = Shape(kind="rect", color=(255, 0, 0), size=(10, 6), x=150.0, y=90.0, vx=7.0, vy=5.0)
    signs = set()
    for _ in range(200):
        shape.step(160, 96)
        assert 10 <= shape.x <= 150 and 6 <= shape.y <= 90
        signs.add((shape.vx > 0, shape.vy > 0))
    assert len(signs) == 4  # it went every which way


def test_ensure_clips_writes_only_missing_ones(tmp_path: Path) -> None:
    specs = [SMALL, ClipSpec("second", "astronaut", seed=1, width=64, height=48, fps=5, seconds=1)]
    said: list[str] = []
    paths = ensure_clips(tmp_path, specs, progress=said.append)
    assert [p.name for p in paths] == ["small.mp4", "second.mp4"] and len(said) == 2
    before = paths[0].stat().st_mtime_ns
    paths[1].unlink()
    said.clear()
    ensure_clips(tmp_path, specs, progress=said.append)
    # The kept one is named as kept (whatever size it was written at), the missing one written.
    assert said == [f"kept clip {paths[0]} (already there, as it was written)", said[1]]
    assert said[1].startswith(f"writing clip {paths[1]}")
    assert paths[0].stat().st_mtime_ns == before


def test_clip_spec_rejects_sizes_h264_cannot_take() -> None:
    with pytest.raises(ValueError, match="even"):
        ClipSpec("odd", "coffee", seed=0, width=161)


# --------------------------------------------------------------------------- config


def test_cameras_cycle_through_the_clips() -> None:
    clips = [Path("/c/astronaut.mp4"), Path("/c/coffee.mp4"), Path("/c/rocket.mp4")]
    cams = assign_clips(clips, 5)
    assert [name for name, _ in cams] == [
        "cam1-astronaut",
        "cam2-coffee",
        "cam3-rocket",
        "cam4-astronaut",
        "cam5-coffee",
    ]
    assert cams[3][1] == clips[0]


def test_demo_config_is_a_valid_config_file(tmp_path: Path) -> None:
    layout = DemoLayout(tmp_path / "out")
    clips = [tmp_path / "a clip.mp4", tmp_path / "b.mp4"]
    thresholds = {label: 0.25 + i / 1000 for i, label in enumerate(PROMPTS)}
    text = demo_config_text(
        cameras=assign_clips(clips, 3),
        engine_dir=tmp_path / "engines",
        layout=layout,
        max_batch=4,
        mask_size=(160, 90),
        conf=0.25,
        thresholds=thresholds,
        mqtt=("broker.local", 1884),
    )
    config = write_demo_config(layout.config, text)
    assert [c.name for c in config.cameras] == ["cam1-a_clip", "cam2-b", "cam3-a_clip"]
    assert [c.url for c in config.cameras] == [str(clips[0]), str(clips[1]), str(clips[0])]
    assert all(not c.loop and c.fps is None for c in config.cameras)
    assert [[z.name for z in c.zones] for c in config.cameras] == [["left_half"], [], []]
    assert config.prompts.classes == list(PROMPTS)
    assert config.prompts.threshold_list == list(thresholds.values())
    assert config.engines.backend == "onnxruntime" and config.engines.device == "cpu"
    kinds = {type(s): s for s in config.sinks}
    assert kinds[JsonlSinkConfig].path == str(layout.jsonl.resolve())  # type: ignore[union-attr]
    assert kinds[VideoSinkConfig].dir == str(layout.video.resolve())  # type: ignore[union-attr]
    mqtt = kinds[MqttSinkConfig]
    assert isinstance(mqtt, MqttSinkConfig) and (mqtt.host, mqtt.port) == ("broker.local", 1884)


def test_demo_config_has_no_mqtt_unless_asked(tmp_path: Path) -> None:
    layout = DemoLayout(tmp_path)
    text = demo_config_text(
        cameras=assign_clips([tmp_path / "a.mp4"], 1),
        engine_dir=tmp_path / "engines",
        layout=layout,
        max_batch=4,
        mask_size=(160, 90),
        draw_masks=False,
        conf=0.3,
        thresholds={},
    )
    config = write_demo_config(layout.config, text)
    assert sorted(type(s).__name__ for s in config.sinks) == ["JsonlSinkConfig", "VideoSinkConfig"]
    assert [s.draw_masks for s in config.sinks if isinstance(s, VideoSinkConfig)] == [False]
    assert config.prompts.thresholds == {} and config.prompts.conf == 0.3


def test_clear_results_removes_only_the_previous_outputs(tmp_path: Path) -> None:
    layout = DemoLayout(tmp_path)
    layout.jsonl.mkdir()
    layout.video.mkdir()
    layout.clips.mkdir()
    for path in (layout.jsonl / "cam1.jsonl", layout.video / "cam1.1.mp4", layout.clips / "a.mp4"):
        path.write_bytes(b"x")
    (layout.jsonl / "notes.txt").write_text("keep")
    layout.clear_results()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.mp4", "notes.txt"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("broker", ("broker", 1883)),
        ("broker:1884", ("broker", 1884)),
        ("[::1]:1885", ("::1", 1885)),
        ("::1", ("::1", 1883)),
    ],
)
def test_mqtt_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize("value", ["broker:x", "broker:0", ":1883"])
def test_mqtt_host_port_rejects(value: str) -> None:
    with pytest.raises(InputError, match="--mqtt"):
        parse_host_port(value)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def demo_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model at 448, batch 2, exported once per session (~40 s on a 2-core CPU)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from sam3stream.model.export import export_engines

    root = tmp_path_factory.mktemp("demo-engines")
    return export_engines(random="tiny", resolution=448, batch=2, queries=10, out=root / "b2_q10_r448")


@pytest.mark.slow
def test_demo_end_to_end(demo_engines: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sam3stream", "demo", "--cameras", "2", "--seconds", "3"]
    cmd += ["--engines", str(demo_engines), "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]

    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.strip()}
    for cam in ("cam1-astronaut", "cam2-coffee"):
        assert cam in rows, done.stdout
        processed = int(rows[cam][2])
        results = [
            msgspec.json.decode(line, type=FrameResult)
            for line in (out / "jsonl" / f"{cam}.jsonl").read_bytes().splitlines()
        ]
        assert processed >= 1 and len(results) == processed
        assert [r.seq for r in results] == list(range(processed))
        assert all(r.camera == cam and (r.width, r.height) == (640, 360) for r in results)
        # Random weights, measured thresholds: a few detections per class and frame, with masks.
        assert all(r.detections and all(d.mask is not None for d in r.detections) for r in results)
        assert (out / "video" / f"{cam}.mp4").stat().st_size > 0
    assert "total" in rows and "RANDOM weights" in done.stdout
    assert str(out / "jsonl") in done.stdout and str(demo_engines) in done.stdout
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["astronaut.mp4", "coffee.mp4"]


# --------------------------------------------------------------------------- summary


def test_summary_lists_every_camera_even_without_results(tmp_path: Path) -> None:
    layout = DemoLayout(tmp_path)
    text = demo_config_text(
        cameras=assign_clips([tmp_path / "a.mp4", tmp_path / "b.mp4"], 2),
        engine_dir=tmp_path / "engines",
        layout=layout,
        max_batch=4,
        mask_size=(160, 90),
        conf=0.3,
        thresholds={},
    )
    config = write_demo_config(layout.config, text)
    manifest = EngineManifest(
        resolution=448,
        batch=8,
        queries=50,
        precision="float32",
        model=ModelSpec(
            source="/ckpt", checkpoint_sha256="0", hidden_size=256, text_context=32, num_queries=200
        ),
        graphs={},
        tokenizer="tokenizer",
        versions={},
        created="",
    )
    cam = {
        "frames_decoded": 5,
        "frames_processed": 4,
        "frames_dropped": 1,
        "detections": 6,
        "latency_ms_p50": 120.4,
        "latency_ms_p95": 250.0,
    }
    outcome = RunOutcome(
        snapshot={
            "cameras": {"cam1-a": cam},
            "batches": {"4": {"count": 1, "stage_ms": {"vision": 10.0, "decoder": 20.0}}},
            "sinks": {"mqtt-2": {"errors": 0, "dropped": 3}},
        },
        run_s=2.0,
        stop_reason="time",
        drain_s=0.5,
        drained=False,
        in_flight=2,
        camera_errors={"cam2-b": "no video stream"},
        labels={"cam1-a": Counter({"cup": 4, "cat": 2})},
        latencies_ms=[100.0, 120.0, 130.0, 250.0],
    )
    context = SummaryContext(
        config=config,
        manifest=manifest,
        engine_dir=tmp_path / "engines",
        layout=layout,
        seconds=1.5,
        random_model=False,
        thresholds={},
    )
    lines = format_summary(context, outcome).splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("cam", "total"))}
    assert rows["cam1-a"][1:8] == ["5", "4", "1", "2.00", "120", "250", "6"]
    assert " ".join(rows["cam1-a"][8:]) == "cup 4, cat 2"
    assert rows["cam2-b"][1:9] == ["0", "0", "0", "0.00", "-", "-", "0", "-"]
    assert rows["total"][1:8] == ["5", "4", "1", "2.00", "125", "232", "6"]
    text = "\n".join(lines)
    assert "1.5 s, then 0.5 s" in text and "2 accepted frames got no result" in text
    assert "camera cam2-b failed: no video stream" in text and "sink mqtt-2: 3 results dropped" in text
    assert "RANDOM" not in text and str(layout.jsonl) in text
