"""The Prometheus port: bound before the pipeline runs, a taken one is a config error naming the key."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sam3stream import metrics as metrics_module
from sam3stream.errors import ConfigError
from sam3stream.metrics import Metrics, Reporter
from sam3stream.runtime.fake import FakeBackend
from sam3stream.stream.pipeline import Pipeline
from tests.stream.helpers import camera_toml, make_config, stub_postprocess

pytest.importorskip("prometheus_client")


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another socket is listening on (on loopback: binding 0.0.0.0 to it fails too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def can_bind(port: int) -> bool:
    """Whether nothing listens on ``port`` (connections left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def no_gpu() -> int | None:
    return None


def test_taken_port_is_a_config_error_naming_the_key(taken_port: int) -> None:
    reporter = Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=taken_port, prometheus_host="127.0.0.1")
    with pytest.raises(ConfigError) as info:
        reporter.open()
    [(key, message)] = info.value.problems
    assert key == "metrics.prometheus_port"
    assert message.startswith(f"{taken_port}: address already in use")
    assert "choose a free port" in message
    assert str(info.value).startswith(f"metrics.prometheus_port: {taken_port}: address already in use")


async def test_run_reports_a_taken_port_the_same_way(taken_port: int) -> None:
    # What a pipeline that does not open the reporter first still gets: no raw OSError.
    reporter = Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=taken_port, prometheus_host="127.0.0.1")
    with pytest.raises(ConfigError, match="address already in use"):
        await asyncio.wait_for(reporter.run(), 5)
    assert not reporter.serving.is_set()


async def test_run_serves_on_the_port_open_bound() -> None:
    reporter = Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=0, prometheus_host="127.0.0.1")
    with reporter:
        port = reporter.prometheus_port
        assert port and not can_bind(port)  # bound before run() starts
        task = asyncio.create_task(reporter.run())
        try:
            await asyncio.wait_for(reporter.serving.wait(), 5)
            assert reporter.prometheus_port == port  # the same server, not a second bind
            url = f"http://127.0.0.1:{port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert "# TYPE sam3stream_fps gauge" in body
        finally:
            task.cancel()
            await asyncio.wait({task})
        assert can_bind(port)  # run() closed it when it ended
    assert can_bind(port)


async def test_a_stopping_run_shuts_the_server_down_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server's shutdown waits for its 0.5 s poll: on the loop it would stall every actor.
    threads: list[int] = []
    stop = metrics_module._stop_server

    def recording_stop(server: object) -> None:
        threads.append(threading.get_ident())
        stop(server)

    monkeypatch.setattr(metrics_module, "_stop_server", recording_stop)
    reporter = Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=0, prometheus_host="127.0.0.1")
    with reporter:
        port = reporter.prometheus_port
        task = asyncio.create_task(reporter.run())
        await asyncio.wait_for(reporter.serving.wait(), 5)
        task.cancel()
        await asyncio.wait({task})
        assert port and can_bind(port)
    assert threads and threading.get_ident() not in threads


def test_leaving_the_with_block_closes_a_server_run_never_used() -> None:
    # A run() task cancelled before its first step never reaches its finally: the with block closes.
    with Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=0, prometheus_host="127.0.0.1") as reporter:
        port = reporter.prometheus_port
        assert port and not can_bind(port)
    assert can_bind(port)


def test_missing_prometheus_client_names_the_key_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes the import fail
    reporter = Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=0)
    with pytest.raises(ConfigError) as info:
        reporter.open()
    [(key, message)] = info.value.problems
    assert key == "metrics.prometheus_port" and "sam3stream[prometheus]" in message


def port_config(tmp_path: Path, video: Callable[..., Path], port: int) -> Pipeline:
    cams = camera_toml("cam0", video("c0.mp4", frames=10), loop=True, fps=40)
    config = make_config(tmp_path, cams, extra=f"[metrics]\nprometheus_port = {port}\n")
    return Pipeline(config, backend=FakeBackend(), postprocess=stub_postprocess)


async def test_pipeline_with_a_taken_port_fails_with_the_config_error(
    tmp_path: Path, video: Callable[..., Path], taken_port: int
) -> None:
    pipeline = port_config(tmp_path, video, taken_port)
    with pytest.raises(ConfigError, match=rf"metrics\.prometheus_port: {taken_port}: address already in use"):
        async with asyncio.timeout(20):
            await pipeline.start()
            await pipeline.wait()


async def test_pipeline_with_a_taken_port_fails_before_any_camera_starts(
    tmp_path: Path, video: Callable[..., Path], taken_port: int
) -> None:
    pipeline = port_config(tmp_path, video, taken_port)
    try:
        with pytest.raises(ConfigError, match=r"metrics\.prometheus_port"):
            async with asyncio.timeout(20):
                await pipeline.start()
        # Listed from the start (at zero), but never started.
        cameras = pipeline.metrics.snapshot()["cameras"]
        assert list(cameras) == ["cam0"]
        assert (cameras["cam0"]["state"], cameras["cam0"]["frames_decoded"]) == ("unknown", 0)
    finally:
        await pipeline.abort()


async def test_pipeline_with_a_taken_port_fails_before_the_engine_loads(
    tmp_path: Path, video: Callable[..., Path], taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading (and warming) a GPU engine takes a minute: a taken port must not wait for it."""
    import sam3stream.stream.pipeline as pipeline_module

    loads: list[object] = []

    def counting_open(*args: object, **kwargs: object) -> FakeBackend:
        loads.append(args)
        return FakeBackend()

    monkeypatch.setattr(pipeline_module, "open_backend", counting_open)
    cams = camera_toml("cam0", video("c0.mp4", frames=10), loop=True, fps=40)
    config = make_config(tmp_path, cams, extra=f"[metrics]\nprometheus_port = {taken_port}\n")
    pipeline = Pipeline(config, postprocess=stub_postprocess)
    try:
        with pytest.raises(ConfigError, match=r"metrics\.prometheus_port"):
            async with asyncio.timeout(20):
                await pipeline.start()
        assert loads == []
    finally:
        await pipeline.abort()


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("192.0.2.1", "no network interface of this machine has that address"),  # TEST-NET-1
        ("no-such-host.invalid", "does not resolve"),
    ],
)
def test_a_host_that_cannot_be_bound_is_a_config_error_naming_the_host_key(host: str, says: str) -> None:
    reporter = Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=0, prometheus_host=host)
    with pytest.raises(ConfigError) as info:
        reporter.open()
    [(key, message)] = info.value.problems
    assert key == "metrics.prometheus_host" and says in message and "127.0.0.1" in message


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is a loopback address on Linux only")
@pytest.mark.parametrize(("host", "elsewhere"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_the_endpoint_listens_on_the_configured_host_only(host: str, elsewhere: bool) -> None:
    reporter = Reporter(Metrics(gpu_memory=no_gpu), prometheus_port=0, prometheus_host=host)
    with reporter:
        port = reporter.prometheus_port
        assert port is not None
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "sam3stream_" in body
        # Another address of this machine (all of 127/8 is loopback on Linux) reaches a server
        # on every interface, not one bound to 127.0.0.1.
        assert reachable("127.0.0.2", port) is elsewhere


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("http://0.0.0.0:9090", "is not a host name or IP address"),
        ("0.0.0.0:9090", "is not a host name or IP address"),
        ("  ", "must not be empty"),
    ],
)
def test_a_host_that_can_never_bind_is_refused_by_the_config(host: str, says: str) -> None:
    from sam3stream.config import parse_config

    text = (
        '[engines]\ndir = "e"\n[prompts]\nclasses = ["person"]\n'
        '[[cameras]]\nname = "c"\nurl = "a.mp4"\n'
        f'[metrics]\nprometheus_port = 9090\nprometheus_host = "{host}"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir="/base")
    [(key, message)] = info.value.problems
    assert key == "metrics.prometheus_host" and says in message


@pytest.mark.parametrize("host", ["127.0.0.1", "::", "metrics.internal", "localhost"])
def test_addresses_and_names_are_accepted(host: str) -> None:
    from sam3stream.config import parse_config

    text = (
        '[engines]\ndir = "e"\n[prompts]\nclasses = ["person"]\n'
        '[[cameras]]\nname = "c"\nurl = "a.mp4"\n'
        f'[metrics]\nprometheus_host = "{host}"\n'
    )
    assert parse_config(text, base_dir="/base").metrics.prometheus_host == host
