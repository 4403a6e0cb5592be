"""The real onnxruntime backend in the pipeline: 8 file cameras, every frame exactly once and in
order per camera, in JSONL files and on a real Mosquitto broker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from sam3stream.config import parse_config
from sam3stream.stream.frames import FrameResult
from sam3stream.stream.pipeline import Pipeline
from tests.mosquitto import Mosquitto, mosquitto  # noqa: F401 - the fixture
from tests.sinks.test_mqtt import subscribed

pytestmark = pytest.mark.mqtt


async def test_eight_cameras_through_onnxruntime_into_jsonl_and_mqtt(
    tmp_path: Path,
    tiny_engines: Path,
    video: Callable[..., Path],
    mosquitto: Mosquitto,  # noqa: F811
) -> None:
    counts = [6 + i % 3 for i in range(8)]
    cameras = "".join(
        f'[[cameras]]\nname = "cam{i}"\nurl = "{video(f"cam{i}.mp4", frames=n)}"\n'
        for i, n in enumerate(counts)
    )
    config = parse_config(
        f"""
[engines]
dir = "{tiny_engines}"
backend = "onnxruntime"

[prompts]
classes = ["person", "hand"]
conf = 0.25

[batching]
max_batch = 4
max_wait_ms = 20

[lifecycle]
drain_timeout_s = 300  # a loaded CI machine may take a while to finish the last batches

{cameras}
[[sinks]]
type = "jsonl"
path = "{tmp_path / "jsonl"}"

[[sinks]]
type = "mqtt"
host = "{mosquitto.host}"
port = {mosquitto.port}
prefix = "plant"
qos = 1
""",
        source="test.toml",
        base_dir=tmp_path,
    )
    async with subscribed(mosquitto, "plant/+/detections") as sub:
        async with Pipeline(config) as pipe:
            await pipe.wait()
        total = sum(counts)
        await sub.wait_for(lambda: len(sub.messages) >= total, within=20)
    by_camera: dict[str, list[int]] = {}
    for topic, payload, _ in sub.messages:
        result = msgspec.json.decode(payload, type=FrameResult)
        assert topic == f"plant/{result.camera}/detections"
        by_camera.setdefault(result.camera, []).append(result.seq)
    for i, n in enumerate(counts):
        assert by_camera[f"cam{i}"] == list(range(n))
        lines = (tmp_path / "jsonl" / f"cam{i}.jsonl").read_bytes().splitlines()
        results = [msgspec.json.decode(line, type=FrameResult) for line in lines]
        assert [r.seq for r in results] == list(range(n))
        assert all(r.width == 64 and r.height == 48 for r in results)
    # Results carry the model's detections, with masks at the frame's size.
    det = next(d for r in results for d in r.detections)
    assert det.label in ("person", "hand") and det.mask is not None and tuple(det.mask.size) == (48, 64)
