"""Stall detection: a camera that stops sending is reconnected; one held back by a slow engine is not."""

from __future__ import annotations

import asyncio
import functools
import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sam3stream.runtime.fake import FakeBackend
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import MemorySink, camera_toml, make_config, stub_postprocess


async def test_a_file_blocked_by_a_slow_engine_is_not_a_stall(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = camera_toml("slowpoke", video("s.mp4", frames=4))
    config = make_config(tmp_path, cams, max_batch=1, stall_timeout_s=0.2)
    sink = MemorySink()
    # Each batch takes 0.5 s, so the source waits for room far longer than the stall timeout.
    backend = FakeBackend(delay_s=0.5)
    async with Pipeline(config, backend=backend, sinks=[sink], postprocess=stub_postprocess) as p:
        await asyncio.wait_for(p.wait(), 20)
    assert sink.seqs("slowpoke") == [0, 1, 2, 3]
    assert p.camera_errors() == {} and p.sources["slowpoke"].reconnects == 0


class _HangingHandler(http.server.BaseHTTPRequestHandler):
    """Sends the first part of a video, then keeps the connection open without sending more."""

    payload = b""
    release = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload[: len(self.payload) // 2])
        self.wfile.flush()
        self.release.wait(30)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def hanging_server(video: Callable[..., Path]) -> Iterator[int]:
    data = video("hang.mp4", frames=60, width=160, height=120).read_bytes()
    release = threading.Event()
    handler = type("Handler", (_HangingHandler,), {"payload": data, "release": release})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="test-http", daemon=True).start()
    yield int(server.server_address[1])
    release.set()
    server.shutdown()
    server.server_close()


async def test_a_live_camera_that_stops_sending_is_reconnected(tmp_path: Path, hanging_server: int) -> None:
    cams = camera_toml("hangs", f"http://127.0.0.1:{hanging_server}/hang.mp4")
    config = make_config(tmp_path, cams, stall_timeout_s=0.5)
    sink = MemorySink()
    async with Pipeline(config, backend=FakeBackend(), sinks=[sink], postprocess=stub_postprocess) as p:
        await asyncio.wait_for(sink.wait_for("hangs"), 10)
        # Half a file arrives, then nothing: within about one stall timeout it is reconnecting.
        await asyncio.wait_for(sink.wait_for_state("hangs", "reconnecting", 2), 10)
        await p.stop()
    errors = [d for cam, state, d in sink.states if cam == "hangs" and state == "reconnecting"]
    assert errors and all(d for d in errors)
    seqs = sink.seqs("hangs")
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # seq keeps counting across reconnects
