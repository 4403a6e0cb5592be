"""CameraSource: one camera, decoded by PyAV on its own thread, into the camera's inbox.

The decode thread does the heavy part (demux, decode, one resize to R x R RGB)
one frame per call; the actor on the loop numbers frames, paces or samples
them, and hands them to the inbox. Because the next frame is only asked for once
the previous one is delivered, a full inbox holds the decoder back (files), and
the stall timer only runs while waiting on the camera, never on the pipeline.

Live cameras reconnect forever with jittered exponential backoff; files end
(after looping, if asked), and a file that cannot be read fails this camera only
(state "failed", with its error).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import av
import av.error
import numpy as np
import numpy.typing as npt
import structlog

from sam3stream.backoff import backoff_delay
from sam3stream.config import CameraConfig, LifecycleConfig
from sam3stream.metrics import Metrics
from sam3stream.outage import Outage
from sam3stream.stream.frames import Frame
from sam3stream.stream.mailbox import Inbox
from sam3stream.stream.threads import close_executor, single_thread

__all__ = ["STOPPED_NOTICE_S", "Backoff", "CameraSource", "CameraState", "StateListener"]

log = structlog.get_logger(__name__)

# "ended": a file camera read to its end; "failed": one that ended on an error (cannot open, a
# read error, no frames), with the error beside it; "stopped": stopped by the pipeline.
CameraState = Literal["connecting", "running", "reconnecting", "ended", "failed", "stopped"]
# How long a stopping source may spend telling the sinks it stopped (an MQTT status message).
STOPPED_NOTICE_S = 1.0
# on_state(camera, state, error or None): e.g. MQTT's retained status topic
StateListener = Callable[[str, str, str | None], Awaitable[None]]

# What a broken, missing or unreachable stream raises from PyAV.
_STREAM_ERRORS = (av.error.FFmpegError, OSError, EOFError)
_THREAD_CLOSE_S = 5.0


class _EndOfStream(Exception):
    """The decoder has no more frames (a plain end, not an error)."""


class _Stopped(Exception):
    """The decode thread was asked to stop."""


class _SourceFailure(Exception):
    """The stream could not be opened or broke while reading."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before reconnect attempt ``n``: uniform(0, min(cap, base * 2**n))."""

    base_s: float
    cap_s: float
    rng: random.Random

    def delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.base_s, self.cap_s, self.rng.uniform)


@dataclass(slots=True)
class _Decoded:
    pts: int | None
    stream_time: float | None
    capture_time: float
    width: int
    height: int
    pixels: npt.NDArray[np.uint8]
    image: npt.NDArray[np.uint8] | None


_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pass|pwd|token|key|secret|auth)[^=&]*=)[^&]*")


def redact_url(url: str) -> str:
    """``url`` fit for a log line: a password in its user info, and the values of query
    parameters that look like credentials, replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url  # a file path
    netloc = parts.netloc
    if "@" in netloc:
        user_info, host = netloc.rsplit("@", 1)
        user = user_info.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in user_info else f"{user}@{host}"
    query = _SECRET_QUERY.sub(r"\1***", "?" + parts.query)[1:] if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _reason(exc: BaseException) -> str:
    """FFmpeg's (or the OS's) reason alone: without the errno, and without the URL its text
    ends in, which may hold credentials."""
    return str(getattr(exc, "strerror", None) or exc)


def _open_problem(exc: BaseException, camera: CameraConfig) -> str:
    """Why a camera could not be opened, in words (``_reason``), and a file's path (a network
    URL stays out of the message: it may hold credentials)."""
    reason = _reason(exc)
    if isinstance(exc, av.error.InvalidDataError):
        empty = not camera.is_network and os.path.isfile(camera.url) and os.path.getsize(camera.url) == 0
        reason = "the file is empty" if empty else f"not a video FFmpeg can read ({reason})"
    return reason if camera.is_network else f"{reason}: {camera.url}"


class _Decoder:
    """The thread side: every method runs on the camera's decode thread."""

    def __init__(
        self,
        url: str,
        options: dict[str, str],
        *,
        resolution: int,
        keep_image: bool,
        stop: threading.Event,
        timeout_s: float | None,
    ) -> None:
        self._url = url
        self._options = options
        self._resolution = resolution
        self._keep_image = keep_image
        self._stop = stop
        self._timeout_s = timeout_s
        self._container: Any = None
        self._frames: Iterator[Any] = iter(())
        self.bad_packets = 0

    def open(self) -> None:
        self._container = av.open(self._url, options=self._options, timeout=self._timeout_s)
        if not self._container.streams.video:
            raise _SourceFailure("no video stream")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._frames = self._iterate(stream)

    def _iterate(self, stream: Any) -> Iterator[Any]:
        for packet in self._container.demux(stream):
            if self._stop.is_set():
                raise _Stopped
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                # One damaged packet costs its frames, not the stream.
                self.bad_packets += 1
                continue
            yield from frames

    def next(self) -> _Decoded:
        frame = next(self._frames, None)
        if frame is None:
            raise _EndOfStream
        r = self._resolution
        pixels = frame.reformat(width=r, height=r, format="rgb24").to_ndarray()
        image = frame.to_ndarray(format="rgb24") if self._keep_image else None
        has_time = frame.pts is not None and frame.time_base is not None
        stream_time = float(frame.pts * frame.time_base) if has_time else None
        return _Decoded(
            pts=frame.pts,
            stream_time=stream_time,
            capture_time=time.time(),
            width=frame.width,
            height=frame.height,
            pixels=pixels,
            image=image,
        )

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class CameraSource:
    """Decode one camera into its inbox until cancelled (live) or the file ends."""

    def __init__(
        self,
        camera: CameraConfig,
        inbox: Inbox,
        *,
        resolution: int,
        lifecycle: LifecycleConfig,
        metrics: Metrics,
        keep_image: bool = False,
        rng: random.Random | None = None,
        on_state: StateListener | None = None,
    ) -> None:
        self.camera = camera
        self.name = camera.name
        self.mode = camera.effective_mode
        self._inbox = inbox
        self._resolution = resolution
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._keep_image = keep_image
        self._on_state = on_state
        self._backoff = Backoff(lifecycle.reconnect_base_s, lifecycle.reconnect_cap_s, rng or random.Random())
        self._outage = Outage()
        self._period = 1.0 / camera.fps if camera.fps else None
        self._next_due = 0.0
        self.state: CameraState = "connecting"
        self._announced = False  # the first state is news even though it equals the initial one
        self.error: str | None = None
        self.seq = 0  # the next frame's number: keeps counting across reconnects and loops
        self.reconnects = 0
        self._session_frames = 0
        self._log = log.bind(camera=self.name)

    async def _set_state(self, state: CameraState, error: str | None = None, **fields: Any) -> None:
        changed = state != self.state or error is not None or not self._announced
        self._announced = True
        if error is not None:
            fields["error"] = error
        say = self._log.info
        if state == "reconnecting":
            # A camera that keeps failing must show at logging.level = "warning" too, but once
            # per outage (and as a reminder while it lasts), not at every retry.
            say = self._log.warning if self._outage.failed() else self._log.debug
            fields.update(attempts=self._outage.attempts, down_s=round(self._outage.down_s, 1))
        if changed or fields:
            say("camera_state", state=state, **fields)
        self.state = state
        self._metrics.camera_state(self.name, state)
        if changed and self._on_state is not None:
            await self._on_state(self.name, state, error)

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            await self._say_stopped()
            raise

    async def _say_stopped(self) -> None:
        """Stopped by the pipeline: say so, or the last state ("running") would stay on the status
        topic and in the metrics. Bounded: the pipeline waits this long for it before it closes
        the sinks."""
        if self.state in ("ended", "failed", "stopped"):
            return
        with contextlib.suppress(Exception, asyncio.CancelledError):
            async with asyncio.timeout(STOPPED_NOTICE_S):
                await self._set_state("stopped", frames=self.seq)

    async def _run(self) -> None:
        await self._set_state("connecting", url=redact_url(self.camera.url), mode=self.mode)
        attempt = 0
        while True:
            failure: str | None = None
            try:
                await self._session()
            except _SourceFailure as exc:
                failure = str(exc)
            produced = self._session_frames
            if self.mode == "file":
                if failure is None and self.camera.loop and produced > 0:
                    self._log.info("file_loop", seq=self.seq)
                    continue
                self.error = failure if failure is not None else (None if produced else "no frames")
                if self.error is not None:
                    self._log.error("camera_failed", url=redact_url(self.camera.url), error=self.error)
                    await self._set_state("failed", error=self.error)
                else:
                    await self._set_state("ended", frames=self.seq)
                return
            # Live: whatever happened, come back. A session that delivered frames was healthy.
            attempt = 0 if produced else attempt
            delay = self._backoff.delay(attempt)
            attempt += 1
            self.reconnects += 1
            await self._set_state("reconnecting", error=failure or "stream ended", retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """Open the stream and deliver frames until it ends (counted in ``_session_frames``)."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        pool = single_thread(f"decode-{self.name}")
        decoder = _Decoder(
            self.camera.url,
            {key: str(value) for key, value in self.camera.options.items()},
            resolution=self._resolution,
            keep_image=self._keep_image,
            stop=stop,
            # Bounds each blocking open/read in the thread, so a dead network camera
            # cannot pin it; local files never wait.
            timeout_s=self._lifecycle.stall_timeout_s if self.camera.is_network else None,
        )
        self._session_frames = 0
        try:
            try:
                async with asyncio.timeout(self._lifecycle.stall_timeout_s):
                    await loop.run_in_executor(pool, decoder.open)
            except TimeoutError:
                raise _SourceFailure(f"no answer within {self._lifecycle.stall_timeout_s} s") from None
            except _STREAM_ERRORS as exc:
                raise _SourceFailure(f"cannot open: {_open_problem(exc, self.camera)}") from exc
            await self._set_state("running")
            while True:
                try:
                    async with asyncio.timeout(self._lifecycle.stall_timeout_s):
                        decoded = await loop.run_in_executor(pool, decoder.next)
                except _EndOfStream:
                    bad = decoder.bad_packets
                    # "stream_ended" is the end of one pass over it; the camera's own end is its
                    # state (a looping file starts over: file_loop).
                    self._log.info("stream_ended", frames=self._session_frames, bad_packets=bad)
                    return
                except TimeoutError:
                    stall, n = self._lifecycle.stall_timeout_s, self._session_frames
                    raise _SourceFailure(f"stalled: no frame for {stall} s after {n} frames") from None
                except _STREAM_ERRORS as exc:
                    raise _SourceFailure(
                        f"read error after {self._session_frames} frames: {_reason(exc)}"
                    ) from exc
                self._session_frames += 1
                # Back once frames flow: a camera that opens and then gives nothing is still down.
                if self._session_frames == 1 and (outage := self._outage.recovered()) is not None:
                    self._log.info("camera_recovered", attempts=outage[0], down_s=round(outage[1], 1))
                await self._deliver(decoded, loop.time())
        finally:
            stop.set()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Before the decode thread's close, which a network camera can hold for seconds.
                await self._say_stopped()
            await close_executor(pool, _THREAD_CLOSE_S, decoder.close)

    async def _deliver(self, decoded: _Decoded, now: float) -> None:
        live = self.mode == "live"
        if live:
            # Every decoded frame counts, also those the sampling below skips (its inbox never
            # waits: a full one drops its oldest frame and counts that).
            self._metrics.frame_decoded(self.name)
        if self._period is not None:
            if live:
                # Sample down to the target rate on the stream's own clock when it has one.
                t = decoded.stream_time if decoded.stream_time is not None else now
                if t < self._next_due - 10 * self._period:
                    self._next_due = t  # the clock went back: a reconnect or a new stream
                if t + 1e-6 < self._next_due:
                    return
                self._next_due += self._period
                if self._next_due <= t:
                    self._next_due = t + self._period  # after a gap, do not burst to catch up
            else:
                # Pace a file to the target rate; after a stall, carry on rather than burst.
                wait = self._next_due - now
                if wait > 0:
                    await asyncio.sleep(wait)
                    # A paced file frame is "captured" when it is released, not when decoded early.
                    decoded.capture_time = time.time()
                self._next_due = max(self._next_due, now) + self._period
        frame = Frame(
            camera=self.name,
            seq=self.seq,
            pts=decoded.pts,
            stream_time=decoded.stream_time,
            capture_time=decoded.capture_time,
            width=decoded.width,
            height=decoded.height,
            pixels=decoded.pixels,
            image=decoded.image,
        )
        await self._inbox.put(frame)
        # Counted once accepted: a file frame cancelled at stop while it waited for its pacing time
        # or for room in the inbox was never read, so that decoded = processed + dropped.
        self.seq += 1
        if not live:
            self._metrics.frame_decoded(self.name)
