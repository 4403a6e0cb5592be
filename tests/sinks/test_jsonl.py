from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import structlog

from sam3stream.metrics import Metrics
from sam3stream.sinks.jsonl import JsonlSink, camera_files
from sam3stream.stream.frames import FrameResult
from tests.sinks.results import make_result


def read_all(directory: Path, camera: str) -> list[FrameResult]:
    out = []
    for path in camera_files(directory, camera):
        for line in path.read_bytes().splitlines():
            out.append(msgspec.json.decode(line, type=FrameResult))
    return out


async def test_one_line_per_result_per_camera(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "out")
    await sink.start()
    sent = [make_result(i, camera="a" if i % 3 else "b") for i in range(100)]
    for r in sent:
        await sink.publish(r)
    await sink.aclose()

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jsonl", "b.jsonl"]
    for cam in ("a", "b"):
        lines = (tmp_path / "out" / f"{cam}.jsonl").read_bytes().splitlines()
        expected = [r for r in sent if r.camera == cam]
        assert len(lines) == len(expected)
        assert [msgspec.json.decode(line, type=FrameResult) for line in lines] == expected
        # Compact encoding, with the schema version on every line.
        assert all(b", " not in line and b'"schema":1' in line for line in lines)


async def test_rotation_at_size_bound_loses_nothing(tmp_path: Path) -> None:
    line_len = len(msgspec.json.encode(make_result(0))) + 1
    limit_mb = 10 * line_len / 1_000_000  # about ten lines per file
    sink = JsonlSink(tmp_path, rotate_mb=limit_mb)
    await sink.start()
    sent = [make_result(i) for i in range(95)]
    for r in sent:
        await sink.publish(r)
    await sink.aclose()

    files = camera_files(tmp_path, "cam1")
    assert [p.name for p in files[:3]] == ["cam1.jsonl", "cam1.1.jsonl", "cam1.2.jsonl"]
    assert len(files) >= 9
    limit = int(limit_mb * 1_000_000)
    assert all(p.stat().st_size <= limit for p in files)
    # Every file but the last is full: adding the next line would have crossed the bound.
    assert all(p.stat().st_size + line_len > limit for p in files[:-1])
    assert read_all(tmp_path, "cam1") == sent


async def test_restart_appends_to_newest_file(tmp_path: Path) -> None:
    line_len = len(msgspec.json.encode(make_result(0))) + 1
    limit_mb = 4 * line_len / 1_000_000
    for batch in (range(0, 10), range(10, 13)):
        sink = JsonlSink(tmp_path, rotate_mb=limit_mb)
        await sink.start()
        for i in batch:
            await sink.publish(make_result(i))
        await sink.aclose()
    assert [r.seq for r in read_all(tmp_path, "cam1")] == list(range(13))


async def test_similar_camera_names_keep_their_own_files(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, rotate_mb=0.000001)  # every line starts a new file
    await sink.start()
    for i in range(3):
        for cam in ("cam", "cam-1", "cam.1"):
            await sink.publish(make_result(i, camera=cam))
    await sink.aclose()
    for cam in ("cam", "cam-1", "cam.1"):
        got = read_all(tmp_path, cam)
        assert [(r.camera, r.seq) for r in got] == [(cam, 0), (cam, 1), (cam, 2)]


async def test_write_failure_is_counted_and_reported(tmp_path: Path) -> None:
    metrics = Metrics()
    target = tmp_path / "out"
    sink = JsonlSink(target, name="files", metrics=metrics)
    await sink.start()
    target.rmdir()
    target.write_text("not a directory")  # opening out/cam1.jsonl now fails
    await sink.publish(make_result(0))
    await sink.publish(make_result(1))
    # Whether the writer task or the final flush hit it, the failure is not silent.
    with pytest.raises(OSError):
        await sink.aclose()
    assert metrics.snapshot()["sinks"]["files"]["dropped"] == 2


async def publish_one_by_one(sink: JsonlSink, results: list[FrameResult]) -> list[OSError]:
    """Publish, letting the writer take each result on its own; the errors publish() raised."""
    raised = []
    for r in results:
        try:
            await sink.publish(r)
        except OSError as exc:
            raised.append(exc)
        for _ in range(50):  # until the writer thread has taken and settled it
            await asyncio.sleep(0.002)
            if not sink._pending and sink._inflight is None:
                break
    return raised


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_every_result_a_failing_file_loses_is_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    (tmp_path / "bad.jsonl").symlink_to("/dev/full")  # every write fails: no space left
    sink = JsonlSink(tmp_path, name="files", metrics=metrics)
    await sink.start()
    with structlog.testing.capture_logs() as logs:
        raised = await publish_one_by_one(
            sink, [make_result(i, camera=c) for i in range(6) for c in ("bad", "ok")]
        )
        try:
            await sink.aclose()
        except OSError as exc:
            raised.append(exc)
    # Reporting the failure to a caller costs no result: all 6 of "bad" are counted, none of "ok" is lost.
    assert [(r.camera, r.seq) for r in read_all(tmp_path, "ok")] == [("ok", i) for i in range(6)]
    assert metrics.snapshot()["sinks"]["files"]["dropped"] == 6
    assert sink.dropped == 6
    # Reported once, naming the file, however many batches failed.
    path = str(tmp_path / "bad.jsonl")
    assert len(raised) == 1 and raised[0].filename == path
    failed = [e for e in logs if e["event"] == "jsonl_write_failed"]
    assert len(failed) == 1 and failed[0]["path"] == path


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_file_that_recovers_gets_the_new_results_only(tmp_path: Path) -> None:
    link = tmp_path / "cam1.jsonl"
    link.symlink_to("/dev/full")
    sink = JsonlSink(tmp_path, name="files")
    await sink.start()
    with structlog.testing.capture_logs() as logs:
        raised = await publish_one_by_one(sink, [make_result(i) for i in range(3)])
        link.unlink()  # room again: the next batch creates a real file
        raised += await publish_one_by_one(sink, [make_result(i) for i in range(3, 6)])
        await sink.aclose()
    assert len(raised) == 1
    # The lost lines are not written late behind the count's back: only the new ones are there.
    assert [r.seq for r in read_all(tmp_path, "cam1")] == [3, 4, 5]
    assert sink.dropped == 3
    recovered = [e for e in logs if e["event"] == "jsonl_write_recovered"]
    assert len(recovered) == 1 and recovered[0]["lost"] == 3 and recovered[0]["path"] == str(link)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_rotation_onto_a_failing_file_counts_only_the_lines_it_lost(tmp_path: Path) -> None:
    """The lines a batch wrote before rotating are in the closed file: only the rest are lost."""
    line_len = len(msgspec.json.encode(make_result(0))) + 1
    sink = JsonlSink(tmp_path, name="files", rotate_mb=2.5 * line_len / 1_000_000)  # two lines a file
    await sink.start()
    assert await publish_one_by_one(sink, [make_result(0)]) == []
    (tmp_path / "cam1.1.jsonl").symlink_to("/dev/full")  # where the next rotation goes
    for i in range(1, 5):  # one batch: the writer has not run yet
        await sink.publish(make_result(i))
    with pytest.raises(OSError) as info:
        await sink.aclose()
    assert info.value.filename == str(tmp_path / "cam1.1.jsonl")
    assert [r.seq for r in msgspec_lines(tmp_path / "cam1.jsonl")] == [0, 1]
    assert sink.dropped == 3


def msgspec_lines(path: Path) -> list[FrameResult]:
    return [msgspec.json.decode(line, type=FrameResult) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("tail", [b'{"schema":1,"camera":"cam1","se', b"", b"no newline at all"])
async def test_a_line_left_half_written_is_removed_before_appending(tmp_path: Path, tail: bytes) -> None:
    # A full disk or a killed process can leave a line half-written; the next line appended
    # onto it would make both unreadable.
    first = msgspec.json.encode(make_result(0)) + b"\n" if tail != b"no newline at all" else b""
    (tmp_path / "cam1.jsonl").write_bytes(first + tail)
    sink = JsonlSink(tmp_path)
    await sink.start()
    await sink.publish(make_result(1))
    await sink.aclose()
    want = [1] if not first else [0, 1]
    assert [r.seq for r in read_all(tmp_path, "cam1")] == want  # every line parses
