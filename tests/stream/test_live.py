"""Live cameras: latest-wins under overload, and reconnecting to a camera that comes up late."""

from __future__ import annotations

import asyncio
import functools
import http.server
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from sam3stream.runtime.fake import FakeBackend
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config, stub_postprocess


async def test_live_source_faster_than_inference_drops_oldest_and_stays_bounded(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = "".join(camera_toml(f"live{i}", video(f"l{i}.mp4", frames=120), mode="live") for i in range(2))
    config = make_config(tmp_path, cams, max_batch=2)
    sink = MemorySink()
    backend = FakeBackend(delay_s=0.05)  # "GPU" time per batch: far slower than decoding
    async with Pipeline(config, backend=backend, sinks=[sink], postprocess=stub_postprocess) as p:
        high_batches = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            high_batches = max(high_batches, p.batches.qsize())
            await asyncio.sleep(0.01)
        await p.stop()

    snap = p.metrics.snapshot()["cameras"]
    for name in ("live0", "live1"):
        assert snap[name]["frames_dropped"] > 0
        assert p.inboxes[name].high_water == 1  # latest wins: one waiting frame at most
        seqs = sink.seqs(name)
        assert seqs and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert snap[name]["frames_decoded"] > len(seqs)
    assert high_batches <= config.batching.batch_queue
    # Frames are never older than a few batches: the queue cannot build up behind a slow engine.
    worst = max(r.timing.end_to_end for rs in sink.results.values() for r in rs)
    assert worst < 2000
    assert p.drained is True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def late_http_server(tmp_path: Path) -> Iterator[tuple[int, Callable[[], None]]]:
    """A port nobody listens on yet, and a function that starts serving tmp_path on it."""
    port = _free_port()
    servers: list[http.server.ThreadingHTTPServer] = []

    def start() -> None:
        handler = functools.partial(_QuietHandler, directory=str(tmp_path))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="test-http", daemon=True).start()
        servers.append(server)

    yield port, start
    for server in servers:
        server.shutdown()
        server.server_close()


async def test_camera_down_at_start_is_retried_until_it_comes_up(
    tmp_path: Path, video: Callable[..., Path], late_http_server: tuple[int, Callable[[], None]]
) -> None:
    port, start_server = late_http_server
    video("remote.mp4", frames=20)
    url = f"http://cam:S3CRET@127.0.0.1:{port}/remote.mp4?token=T0KEN"  # credentials stay out of logs
    cams = camera_toml("remote", url) + camera_toml("local", video("local.mp4", frames=200), fps=50)
    config = make_config(tmp_path, cams)
    sink = MemorySink()
    with structlog.testing.capture_logs() as logs:
        async with Pipeline(config, backend=FakeBackend(), sinks=[sink], postprocess=stub_postprocess) as p:
            await asyncio.sleep(0.8)
            assert p.camera_states()["remote"] == "reconnecting"
            assert sink.seqs("remote") == []
            assert sink.seqs("local")  # the other camera is not held up
            start_server()
            await asyncio.wait_for(sink.wait_for("remote"), 10)
            await p.stop()
    assert sink.seqs("remote")
    assert p.sources["remote"].reconnects >= 2
    states = [s for cam, s, _ in sink.states if cam == "remote"]
    assert "reconnecting" in states and "running" in states
    # The first state is announced too, and a stop replaces the last one on the status topic.
    assert states[0] == "connecting"
    assert states[-1] == "stopped" and p.camera_states()["remote"] == "stopped"
    assert "cannot open" in next(d for cam, s, d in sink.states if cam == "remote" and d)
    # A camera that keeps failing shows at logging.level = "warning", once per outage, not at
    # every retry; its recovery says how long it was down.
    retries = [e for e in logs if e["event"] == "camera_state" and e["state"] == "reconnecting"]
    assert len(retries) >= 2
    assert [e["log_level"] for e in retries] == ["warning"] + ["debug"] * (len(retries) - 1)
    assert [e["attempts"] for e in retries] == list(range(1, len(retries) + 1))
    (recovered,) = [e for e in logs if e["event"] == "camera_recovered"]
    assert recovered["attempts"] == len(retries) and recovered["down_s"] > 0
    said = repr(logs) + repr(sink.states)
    assert "S3CRET" not in said and "T0KEN" not in said
    assert any(e.get("url") == f"http://cam:***@127.0.0.1:{port}/remote.mp4?token=***" for e in logs)


async def test_live_fps_samples_on_the_stream_clock(tmp_path: Path, video: Callable[..., Path]) -> None:
    cams = camera_toml("sampled", video("s.mp4", frames=50, fps=25), mode="live", fps=5)
    config = make_config(tmp_path, cams)
    sink = MemorySink()
    async with Pipeline(config, backend=FakeBackend(), sinks=[sink], postprocess=stub_postprocess) as p:
        await asyncio.wait_for(sink.wait_for("sampled", 8), 10)
        await p.stop()
    times = [r.stream_time for r in sink.results["sampled"]]
    assert all(t is not None for t in times)
    gaps = [b - a for a, b in itertools.pairwise(times) if a is not None and b is not None and b > a]
    # One frame in five of a 25 fps stream: 0.2 s apart (more where latest-wins dropped one).
    assert gaps and all(g > 0.2 - 1e-3 for g in gaps)
    assert p.metrics.snapshot()["cameras"]["sampled"]["frames_decoded"] >= 5 * len(gaps)


async def test_a_stop_tells_the_sinks_each_camera_stopped_before_closing_them(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    # Nothing in flight at the stop (a camera at 2 frames/s), so the drain itself never waits:
    # the sinks must still hear "stopped" before they close, or MQTT keeps "running" retained.
    cams = camera_toml("slow", video("slow.mp4", frames=50, fps=25), fps=2)
    config = make_config(tmp_path, cams, max_batch=1)
    sink = MemorySink()
    async with Pipeline(config, backend=FakeBackend(), sinks=[sink], postprocess=stub_postprocess) as p:
        await asyncio.wait_for(sink.wait_for("slow", 3), 10)
        await p.stop()
    assert sink.closed
    assert sink.states_after_close == []
    assert [s for c, s, _ in sink.states if c == "slow"][-1] == "stopped"
