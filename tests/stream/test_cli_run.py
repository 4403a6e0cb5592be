"""``python -m sam3stream run`` as a process: SIGTERM drains and exits 0; errors exit non-zero."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.stream.helpers import camera_toml

ROOT = Path(__file__).resolve().parents[2]
DRAIN_S = 5


def start(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "sam3stream", "run", str(config)],
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def running(config: Path) -> Iterator[subprocess.Popen[str]]:
    """``sam3stream run config`` as a process, killed on the way out if it is still running."""
    proc = start(config)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def signal_and_wait(proc: subprocess.Popen[str], sig: signal.Signals, timeout: float) -> tuple[str, float]:
    """Send ``sig`` and wait for the process to end: its stderr and the seconds that took."""
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=timeout)
    return stderr, time.monotonic() - sent


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(read_jsonl(path)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"fewer than {n} results in {path}"
        time.sleep(0.05)


def write_config(
    tmp_path: Path,
    cameras: str,
    backend: str = "fake",
    fake: str | None = None,
    max_batch: int = 4,
    log_format: str = "json",
) -> Path:
    """A config running ``cameras`` into a JSONL sink; ``fake`` is the fake engine's fake.json."""
    if fake is not None:
        (tmp_path / "engines").mkdir(exist_ok=True)
        (tmp_path / "engines" / "fake.json").write_text(fake)
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
[engines]
dir = "engines"
backend = "{backend}"

[prompts]
classes = ["person", "hand"]
conf = 0.05

[batching]
max_batch = {max_batch}
max_wait_ms = 10

[[sinks]]
type = "jsonl"
path = "out"

[logging]
format = "{log_format}"

[lifecycle]
drain_timeout_s = {DRAIN_S}

{cameras}
"""
    )
    return config


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fatal(stderr: str) -> str:
    """The message of the last stderr line, which under format = "json" must be a JSON "fatal"
    event like the log's other lines."""
    record = json.loads(stderr.strip().splitlines()[-1])
    assert record["event"] == "fatal" and record["level"] == "error" and record["timestamp"]
    message: str = record["error"]
    return message


def events(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


# SIGHUP (a closed terminal, `systemctl reload`, logrotate) stops the service as SIGTERM does.
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_drains_without_losing_or_repeating_results(
    tmp_path: Path, video: Callable[..., Path], sig: signal.Signals
) -> None:
    cams = "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=10), loop=True, fps=30) for i in range(3))
    with running(write_config(tmp_path, cams)) as proc:
        wait_for_lines(tmp_path / "out" / "cam0.jsonl", 20, proc)
        stderr, took = signal_and_wait(proc, sig, DRAIN_S + 10)
    assert proc.returncode == 0, stderr
    assert took < DRAIN_S + 5
    stopped = [e for e in events(stderr) if e.get("event") == "pipeline_stopped"]
    assert stopped and stopped[0]["drained"] is True and stopped[0]["in_flight"] == 0
    for i in range(3):
        seqs = [r["seq"] for r in read_jsonl(tmp_path / "out" / f"cam{i}.jsonl")]
        assert len(seqs) >= 10
        assert seqs == list(range(len(seqs)))  # none lost, none twice, in order


def test_files_that_end_finish_the_run_with_exit_0(tmp_path: Path, video: Callable[..., Path]) -> None:
    cams = camera_toml("a", video("a.mp4", frames=8)) + camera_toml("b", video("b.mp4", frames=5))
    proc = start(write_config(tmp_path, cams))
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert [r["seq"] for r in read_jsonl(tmp_path / "out" / "a.jsonl")] == list(range(8))
    assert [r["seq"] for r in read_jsonl(tmp_path / "out" / "b.jsonl")] == list(range(5))


def test_a_fatal_error_is_one_line_and_exit_1(tmp_path: Path, video: Callable[..., Path]) -> None:
    # No engine directory and no [engines.export]: nothing to run.
    proc = start(write_config(tmp_path, camera_toml("a", video("a.mp4")), backend="onnxruntime"))
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    last = fatal(stderr)
    assert last.startswith("engine directory") and "does not exist" in last


def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[engines]\ndir = "e"\n[prompts]\nclasses = ["a"]\n[[cameras]]\nname = "x"\nurl = "a.mp4"\nfoo = 1\n'
    )
    proc = start(config)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "cameras[0].foo: unknown key" in stderr and "Traceback" not in stderr


def test_a_second_signal_exits_1_without_waiting_for_the_drain(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    cams = "".join(camera_toml(f"cam{i}", video(f"c{i}.mp4", frames=10), loop=True) for i in range(3))
    # 0.3 s per frame and a dozen frames queued: a full drain would take seconds.
    with running(write_config(tmp_path, cams, fake='{"delay_s": 0.3}', max_batch=1)) as proc:
        wait_for_lines(tmp_path / "out" / "cam0.jsonl", 1, proc)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        stderr, took = signal_and_wait(proc, signal.SIGTERM, 10)
    assert proc.returncode == 1
    assert took < 3
    assert "without draining" in fatal(stderr)


def test_engine_death_exits_1_with_one_line(tmp_path: Path, video: Callable[..., Path]) -> None:
    cams = camera_toml("a", video("a.mp4", frames=30), loop=True)
    proc = start(write_config(tmp_path, cams, fake='{"fail_after": 3}'))
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    assert fatal(stderr).startswith("inference failed, stopping: FakeEngineError")


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_every_camera_failing_exits_1(tmp_path: Path, log_format: str) -> None:
    config = write_config(tmp_path, camera_toml("gone", tmp_path / "missing.mp4"), log_format=log_format)
    proc = start(config)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    if log_format == "console":
        assert stderr.strip().splitlines()[-1].startswith("error: camera gone: cannot open")
    else:
        assert fatal(stderr).startswith("camera gone: cannot open")


def read_until_event(proc: subprocess.Popen[str], name: str) -> list[dict[str, object]]:
    """stderr's JSON log events up to and including the first ``name`` (EOF: the process ended)."""
    assert proc.stderr is not None
    seen: list[dict[str, object]] = []
    for line in proc.stderr:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if seen[-1].get("event") == name:
                return seen
    raise AssertionError(f"no {name} event before the process ended: {seen}")


def test_a_signal_during_the_engine_load_exits_at_once(tmp_path: Path, video: Callable[..., Path]) -> None:
    cams = camera_toml("a", video("a.mp4", frames=10))
    # A load that takes 60 s and cannot be interrupted: the process must not wait for it.
    with running(write_config(tmp_path, cams, fake='{"load_s": 60}')) as proc:
        read_until_event(proc, "engine_loading")
        stderr, took = signal_and_wait(proc, signal.SIGINT, 20)
    assert proc.returncode == 1
    assert took < 10
    assert "exiting while the engine loads" in stderr
    assert "before the pipeline could drain" in fatal(stderr)


def test_an_unwritable_sink_folder_is_one_json_event_naming_the_key(
    tmp_path: Path, video: Callable[..., Path]
) -> None:
    config = write_config(tmp_path, camera_toml("a", video("a.mp4", frames=5)))
    (tmp_path / "out").write_text("a file where the JSONL sink wants its folder")
    proc = start(config)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "Traceback" not in stderr
    assert "sinks[0].path" in fatal(stderr)
