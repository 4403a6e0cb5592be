"""JSON Lines files: one compact FrameResult per line, one file per camera.

Files are ``<dir>/<camera>.jsonl``; with a size bound, the next ones are
``<camera>.1.jsonl``, ``<camera>.2.jsonl``, ... Files are never renamed, so a
reader tailing one never has it moved under it, and reading them in index order
gives the results in order. A restart appends to the newest existing file.

The event loop only encodes (msgspec, microseconds) and appends to a pending
list; a writer task hands whole batches to one dedicated thread, so a slow
disk costs one thread hop per batch rather than per result. Lines are flushed
after every batch (visible to ``tail -f``) but never fsynced.

A failed write (disk full, permissions...) loses that batch's lines for the
file it hit (not those already in a file the batch rotated away from); they are
counted as dropped, the failure is logged once per file
until a write to it succeeds again, and the next ``publish()`` (or ``aclose()``)
raises it once so that the caller counts the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import msgspec
import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.stream.frames import FrameResult

if TYPE_CHECKING:
    from sam3stream.config import JsonlSinkConfig
    from sam3stream.metrics import Metrics

__all__ = ["JsonlSink", "camera_files"]

log = structlog.get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # no dots: they separate the file index
# Past this many unwritten lines, publish() waits for the writer (backpressure).
_MAX_PENDING = 4096


def safe_name(camera: str) -> str:
    """A camera name usable as a file name (config already restricts names; the API does not)."""
    return _UNSAFE.sub("_", camera) or "_"


def _index_of(path: Path, stem: str) -> int | None:
    """0 for ``<stem>.jsonl``, N for ``<stem>.N.jsonl``, None for anything else
    (``cam-1.jsonl`` belongs to camera ``cam-1``, not to ``cam``)."""
    name = path.name
    if name == f"{stem}.jsonl":
        return 0
    prefix, suffix = f"{stem}.", ".jsonl"
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    middle = name[len(prefix) : -len(suffix)]
    return int(middle) if middle.isdigit() else None


def camera_files(directory: Path, camera: str) -> list[Path]:
    """A camera's files, oldest first (the order to read them in)."""
    stem = safe_name(camera)
    found: list[tuple[int, Path]] = []
    for path in directory.glob(f"{stem}*.jsonl"):
        index = _index_of(path, stem)
        if index is not None:
            found.append((index, path))
    return [p for _, p in sorted(found)]


def _cut_partial_line(path: Path) -> None:
    """Remove a line left half-written at the end of ``path`` (a full disk, a killed process),
    which the next line would otherwise be appended onto, making both unreadable."""
    try:
        fh = open(path, "r+b")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with fh:
        end = fh.seek(0, os.SEEK_END)
        keep, pos = 0, end
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = pos + newline + 1
                break
        if keep < end:
            fh.truncate(keep)
            log.warning("jsonl_partial_line_removed", path=str(path), bytes=end - keep)


class _CameraFile:
    """The open file a camera currently appends to (used from the writer thread only)."""

    def __init__(self, directory: Path, camera: str, limit: int | None) -> None:
        self.directory = directory
        self.stem = safe_name(camera)
        self.limit = limit
        existing = camera_files(directory, camera)
        self.index = (_index_of(existing[-1], self.stem) or 0) if existing else 0
        _cut_partial_line(self._path())
        self.fh: IO[bytes] = open(self._path(), "ab")  # noqa: SIM115 - lives until close()
        self.size = self.fh.tell()
        # Lines handed to the current handle since it was last flushed or closed: the ones a
        # failure now loses (those in a file closed at a rotation are safe).
        self.unflushed = 0

    def _path(self) -> Path:
        name = f"{self.stem}.jsonl" if self.index == 0 else f"{self.stem}.{self.index}.jsonl"
        return self.directory / name

    @property
    def path(self) -> Path:
        return self._path()

    def write(self, line: bytes) -> None:
        if self.limit is not None and self.size > 0 and self.size + len(line) > self.limit:
            self.fh.close()
            self.unflushed = 0
            self.index += 1
            self.fh = open(self._path(), "ab")  # noqa: SIM115
            self.size = self.fh.tell()
        self.fh.write(line)
        self.unflushed += 1
        self.size += len(line)

    def flush(self) -> None:
        self.fh.flush()
        self.unflushed = 0


@dataclass
class _Written:
    """What one batch did: the files it appended to, and the files it failed on."""

    ok: list[str] = field(default_factory=list)
    failed: list[tuple[str, int, OSError]] = field(default_factory=list)  # (path, lines lost, error)


def _naming(exc: OSError, path: str) -> OSError:
    """``exc``, naming the file it happened to (a failed write or flush names none)."""
    if exc.filename is not None:
        return exc
    named = OSError(exc.errno, exc.strerror, path) if exc.errno is not None else OSError(f"{path}: {exc}")
    named.__cause__ = exc
    return named


class _Files:
    """All cameras' files. Every method runs on the sink's single writer thread."""

    def __init__(self, directory: Path, limit: int | None) -> None:
        self.directory = directory
        self.limit = limit
        self.open: dict[str, _CameraFile] = {}

    def write_batch(self, batch: Iterable[tuple[str, bytes]]) -> _Written:
        by_camera: dict[str, list[bytes]] = {}
        for camera, line in batch:
            by_camera.setdefault(camera, []).append(line)
        # Camera by camera: one camera's failing file must not cost the others their lines.
        written = _Written()
        for camera, lines in by_camera.items():
            f = self.open.get(camera)
            handed = 0  # lines the file took without an error
            try:
                if f is None:
                    f = self.open[camera] = _CameraFile(self.directory, camera, self.limit)
                for line in lines:
                    f.write(line)
                    handed += 1
                f.flush()
                written.ok.append(str(f.path))
            except OSError as exc:
                path = (
                    str(exc.filename)
                    if exc.filename is not None
                    else str(f.path if f is not None else self.directory)
                )
                # Lost: the lines never handed over, and those still buffered for the failed
                # handle; not those in a file a rotation closed earlier in this batch.
                lost = len(lines) - handed + (f.unflushed if f is not None else 0)
                written.failed.append((path, lost, _naming(exc, path)))
                self._discard(camera)
        return written

    def _discard(self, camera: str) -> None:
        # After a failure the handle may still buffer this batch's lines, which are
        # already counted as lost: reopen next time rather than write them later.
        f = self.open.pop(camera, None)
        if f is not None:
            with contextlib.suppress(OSError):
                f.fh.close()

    def close(self) -> None:
        for f in self.open.values():
            f.fh.close()
        self.open.clear()


class JsonlSink:
    """Lossless by default: a slow disk slows the pipeline down instead of losing results."""

    wants_images = False

    def __init__(
        self,
        directory: str | Path,
        *,
        name: str = "jsonl",
        rotate_mb: float | None = None,
        lossless: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.lossless = lossless
        self.directory = Path(directory)
        self._limit = None if rotate_mb is None else max(1, int(rotate_mb * 1_000_000))
        self._metrics = metrics
        self._encoder = msgspec.json.Encoder()
        self._files = _Files(self.directory, self._limit)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sink-{name}")
        self._pending: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.dropped = 0  # lines lost to failed writes (also reported to metrics)
        self._failing: dict[str, int] = {}  # path -> lines lost since it last worked
        self._error: OSError | None = None  # a failure not yet raised to a caller
        self._inflight: asyncio.Future[_Written] | None = None
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, cfg: JsonlSinkConfig, *, name: str, metrics: Metrics | None = None) -> JsonlSink:
        return cls(
            cfg.path, name=name, rotate_mb=cfg.rotate_mb, lossless=cfg.on_full == "block", metrics=metrics
        )

    async def start(self) -> None:
        await self._in_thread(lambda: self.directory.mkdir(parents=True, exist_ok=True))
        self._writer = asyncio.create_task(self._write_loop(), name=f"sink-{self.name}-writer")
        log.info(
            "sink_started", sink=self.name, kind="jsonl", dir=str(self.directory), rotate_bytes=self._limit
        )

    async def publish(self, result: FrameResult, image: npt.NDArray[np.uint8] | None = None) -> None:
        while not self._room.is_set():
            await self._room.wait()
        self._pending.append((result.camera, self._encoder.encode(result) + b"\n"))
        if len(self._pending) >= _MAX_PENDING:
            self._room.clear()
        self._wake.set()
        if self._error is not None:
            # Report a failed write to the caller once (the fan-out counts it). Only
            # after queueing this result: an earlier batch's failure must not cost it.
            error, self._error = self._error, None
            raise error

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait({self._writer})
            self._writer = None
        if self._inflight is not None:
            # The writer was shielding it: the thread finishes that batch regardless.
            await self._settle(self._inflight)
        batch, self._pending = self._pending, []
        try:
            if batch:
                await self._settle(self._submit(batch))
        finally:
            await self._in_thread(self._files.close)
            self._pool.shutdown(wait=False)
        log.info("sink_closed", sink=self.name, kind="jsonl", dropped=self.dropped)
        if self._error is not None:
            raise self._error

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            self._room.set()
            if batch:
                self._inflight = self._submit(batch)
                # Shielded: cancelling the writer (aclose) must not drop a batch
                # that is queued for the thread but not started yet.
                await self._settle(asyncio.shield(self._inflight))
                self._inflight = None

    def _submit(self, batch: list[tuple[str, bytes]]) -> asyncio.Future[_Written]:
        return asyncio.get_running_loop().run_in_executor(self._pool, self._files.write_batch, batch)

    async def _settle(self, fut: Awaitable[_Written]) -> None:
        written = await fut
        for path in written.ok:
            lost = self._failing.pop(path, None)
            if lost is not None:
                log.info("jsonl_write_recovered", sink=self.name, path=path, lost=lost)
        for path, lines, exc in written.failed:
            # Disk full, permissions...: these lines are lost. Count them and keep
            # going: the disk may recover. Log and report a failing file once, not
            # once per batch (a full disk fails every one).
            self.dropped += lines
            if self._metrics is not None:
                self._metrics.sink_dropped(self.name, lines)
            if path not in self._failing:
                self._failing[path] = 0
                log.error("jsonl_write_failed", sink=self.name, path=path, lines=lines, error=repr(exc))
                self._error = exc
            self._failing[path] += lines

    async def _in_thread(self, fn: Callable[[], object]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, fn)
