"""CUDA streams that no other live backend in this process holds.

``torch.cuda.Stream()`` hands out the streams of a fixed per-device pool in turn (32 per
priority), so the 33rd stream made in a process is the first one again. A torch backend takes
five; from the seventh backend on, two backends would share streams. Sharing a stream is more
than lost overlap: cuBLAS keeps one workspace per stream and a CUDA graph bakes in the
workspace of the stream it was captured on, so two backends' graphs captured on one stream
would scribble on one workspace when they replay side by side. A lease draws from the pool
until it gets streams that no live lease holds, and says so plainly when there are none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sam3stream.errors import BackendUnavailableError

# torch's pool size per device and priority (c10/cuda/CUDAStream.cpp, kStreamsPerPool).
POOL_SIZE = 32

_lock = threading.Lock()
_held: dict[Any, set[int]] = {}


class StreamLease:
    """Streams drawn for one backend on one device; ``release`` gives them back."""

    def __init__(self, device: Any, make: Callable[[], Any], pool_size: int = POOL_SIZE) -> None:
        self._device = device
        self._make = make
        self._pool_size = pool_size
        self._ids: list[int] = []

    def draw(self) -> Any:
        """A stream that no live lease on this device holds (the pool's next free one)."""
        with _lock:
            held = _held.setdefault(self._device, set())
            # The pool is round-robin: pool_size draws visit every stream once.
            for _ in range(self._pool_size):
                stream = self._make()
                key = int(stream.cuda_stream)
                if key not in held:
                    held.add(key)
                    self._ids.append(key)
                    return stream
        # The backend cannot be built without it: give back what this lease drew so far.
        self.release()
        raise BackendUnavailableError(
            f"every one of the {self._pool_size} CUDA streams of GPU {self._device} is held by a "
            "backend of this process; close a backend first, or run the extra engines in "
            "separate processes"
        )

    def release(self) -> None:
        """Give the streams back (idempotent)."""
        with _lock:
            held = _held.get(self._device, set())
            held.difference_update(self._ids)
        self._ids.clear()

    @property
    def held(self) -> int:
        return len(self._ids)
