from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from sam3stream import rle
from sam3stream.metrics import Metrics
from sam3stream.sinks.video import VideoSink
from tests.sinks.results import make_result


def frame_image(seq: int, height: int, width: int) -> np.ndarray:
    # A smooth gradient that moves: compresses well and differs frame to frame.
    y, x = np.mgrid[0:height, 0:width]
    base = ((x + y + 3 * seq) % 256).astype(np.uint8)
    return np.stack([base, base // 2, 255 - base], axis=2)


def decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


async def test_writes_decodable_mp4_with_even_size(tmp_path: Path) -> None:
    sink = VideoSink(tmp_path, fps=15.0)
    await sink.start()
    h, w = 97, 131  # odd on purpose: H.264 in yuv420p needs even sizes
    for i in range(24):
        await sink.publish(make_result(i, width=w, height=h), frame_image(i, h, w))
    path = sink.recording_path("cam1")
    await sink.aclose()

    assert path == tmp_path / "cam1.mp4"
    frames = decode_all(path)
    assert len(frames) == 24
    assert frames[0].shape == (96, 130, 3)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"


async def test_masks_visibly_change_pixels(tmp_path: Path) -> None:
    h, w = 96, 128
    plain = VideoSink(tmp_path / "plain", draw_masks=False, draw_boxes=False)
    drawn = VideoSink(tmp_path / "drawn", draw_boxes=False)
    for sink in (plain, drawn):
        await sink.start()
        for i in range(6):
            await sink.publish(make_result(i, width=w, height=h, detections=1), frame_image(i, h, w))
        await sink.aclose()

    plain_frames = decode_all(tmp_path / "plain" / "cam1.mp4")
    drawn_frames = decode_all(tmp_path / "drawn" / "cam1.mp4")
    assert len(plain_frames) == len(drawn_frames) == 6
    for i, (a, b) in enumerate(zip(plain_frames, drawn_frames, strict=True)):
        det = make_result(i, width=w, height=h, detections=1).detections[0]
        assert det.mask is not None
        mask = rle.decode(det.mask)
        inner = mask.copy()
        inner[:, :-2] &= mask[:, 2:]  # stay off the mask edge: chroma subsampling blurs it
        inner[:-2, :] &= mask[2:, :]
        diff = np.abs(a.astype(int) - b.astype(int)).sum(axis=2)
        # The tint is there, and only there: elsewhere the two encodes differ by codec noise.
        assert diff[inner].mean() > 40
        assert diff[inner].mean() > 5 * diff[~mask].mean()


async def test_stream_time_stamps_and_snapshots(tmp_path: Path) -> None:
    sink = VideoSink(tmp_path, every_n=4)
    await sink.start()
    for i in range(10):
        r = make_result(i)
        await sink.publish(r, frame_image(i, r.height, r.width))
    await sink.aclose()
    with av.open(str(tmp_path / "cam1.mp4")) as container:
        times = [float(f.time) for f in container.decode(video=0)]
    assert len(times) == 10
    # Frames keep their 30 fps stream spacing (make_result: stream_time = seq / 30).
    assert np.allclose(np.diff(times), 1 / 30, atol=2e-3)
    snapshots = sorted(name for name in os.listdir(tmp_path) if name.endswith(".png"))
    assert snapshots == ["cam1-00000003.png", "cam1-00000007.png"]


async def test_never_overwrites_and_counts_frames_without_image(tmp_path: Path) -> None:
    (tmp_path / "cam1.mp4").write_bytes(b"an older recording")
    metrics = Metrics()
    sink = VideoSink(tmp_path, name="rec", metrics=metrics)
    await sink.start()
    await sink.publish(make_result(0))  # no image: nothing to draw on
    r = make_result(1)
    await sink.publish(r, frame_image(1, r.height, r.width))
    await sink.aclose()
    assert (tmp_path / "cam1.mp4").read_bytes() == b"an older recording"
    assert len(decode_all(tmp_path / "cam1.1.mp4")) == 1
    assert metrics.snapshot()["sinks"]["rec"]["dropped"] == 1


def test_a_process_killed_mid_recording_leaves_all_but_the_last_seconds(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    from sam3stream.sinks.video import KEYFRAME_S

    fps, sent = 10.0, 80
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from sam3stream.sinks.video import VideoSink
        from tests.sinks.results import make_result
        from tests.sinks.test_video import frame_image

        async def main():
            sink = VideoSink({str(tmp_path)!r}, fps={fps})
            await sink.start()
            for i in range({sent}):
                await sink.publish(make_result(i, width=64, height=48), frame_image(i, 48, 64))
            await asyncio.sleep(3)  # the encoder thread catches up; then die without closing
            os._exit(0)

        asyncio.run(main())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    kept = len(decode_all(tmp_path / "cam1.mp4"))
    # Lost: the fragment still open (under two keyframe intervals, with the encoder's lookahead).
    assert sent - 2 * KEYFRAME_S * fps <= kept <= sent


async def test_each_cameras_zones_are_outlined_on_its_video_only(tmp_path: Path) -> None:
    h, w = 96, 128
    zone = ("dock", ((0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)))
    sink = VideoSink(tmp_path, draw_masks=False, draw_boxes=False, zones={"cam1": [zone]})
    await sink.start()
    black = np.zeros((h, w, 3), dtype=np.uint8)
    for i in range(3):
        await sink.publish(make_result(i, camera="cam1", width=w, height=h), black)
        await sink.publish(make_result(i, camera="cam2", width=w, height=h), black)
    await sink.aclose()
    zoned, plain = decode_all(tmp_path / "cam1.mp4")[-1], decode_all(tmp_path / "cam2.mp4")[-1]
    # On the left and top edges (within a pixel of where they fall).
    assert zoned[48, 30:34].mean(axis=-1).max() > 150 and zoned[22:26, 64].mean(axis=-1).max() > 150
    assert zoned[48, 64].mean() < 20  # inside
    assert plain.max() < 20
