"""torch.compile's artifacts kept in a folder (by default beside the engines), so that a start on a
machine whose own inductor cache is empty (a new container: that cache lives under /tmp) loads
the generated kernels instead of generating and compiling them again. Beside them, the start-up
choices the backend timed (epilogue forms, attention kernel): a restart takes them as recorded,
so it compiles the graphs that were saved and runs as the last start did (the timings are close
enough that they can draw differently from one start to the next).

The artifacts are keyed inside by the graphs they were made from, so a file from other code or
options is harmless: it is loaded and simply not hit. File names per torch build, GPU model,
resolution, batch, chunk sizes, precision and compile mode keep unrelated configurations apart.
A cache that cannot be read or written costs a warning, never the start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHOICES",
    "CompiledShapes",
    "artifact_files",
    "cache_base",
    "choices_file",
    "device_label",
    "load",
    "load_choices",
    "save",
    "save_choices",
]

log = structlog.get_logger(__name__)

# file -> the artifacts (kind, key) it was loaded with or saved with in this process: a save that
# adds none writes nothing (the serialised order varies, so bytes cannot tell).
_known: dict[Path, set[tuple[str, str]]] = {}
_unusable: set[Path] = set()  # files a load could not use

# The start-up choices a backend times and records (TorchBackend attributes of these names).
CHOICES = ("fused_gelu", "fused_relu", "attention_kernel")
# How they were timed, recorded with them: choices timed another way are timed again. 2: each form
# captured in a CUDA graph (1 timed plain calls, whose host dispatch could reverse the GELU choice).
CHOICES_TIMING = 2


class CompiledShapes:
    """The input shapes each compiled step was called with. torch.compile makes (or loads) a
    graph for each new one, so a save, which serialises every artifact in the process (~55 MB
    at full size), is worth it only after a shape the last save did not see."""

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()
        self._saved: set[tuple[Any, ...]] = set()

    def track(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a compiled step), noting the shapes and dtypes of each call's tensors."""

        def call(*args: Any) -> Any:
            shapes = tuple((tuple(a.shape), str(a.dtype)) for a in args if hasattr(a, "shape"))
            self._seen.add((name, shapes))
            return fn(*args)

        return call

    def new_since_save(self) -> bool:
        return not self._seen <= self._saved

    def mark_saved(self) -> None:
        self._saved |= self._seen


def _keys(info: Any) -> set[tuple[str, str]]:
    return {(kind, key) for kind, keys in info.artifacts.items() for key in keys}


def device_label(device: torch.device) -> str:
    """The GPU model and compute capability (what compiled kernels depend on), or the device type."""
    import torch

    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"


def cache_base(
    folder: Path,
    *,
    torch_version: str,
    device: str,
    resolution: int,
    batch: int,
    vision_chunk: int,
    decoder_frames: int,
    precision: str,
    mode: str | None = None,
) -> Path:
    """The path that names one configuration in ``folder``: its artifacts are in
    ``<stem>.<digest>.bin`` files (artifact_files) and its start-up choices in choices_file.
    The chunk sizes are in it because they set the shapes the choices were timed at."""
    parts = [
        f"torch-{torch_version}",
        device,
        f"{resolution}x{batch}",
        f"c{vision_chunk}d{decoder_frames}",
        precision,
    ]
    if mode:
        parts.append(mode)
    name = "_".join(re.sub(r"[^A-Za-z0-9.+]+", "-", part).strip("-").lower() for part in parts)
    return Path(folder) / f"{name}.bin"


def artifact_files(base: Path) -> list[Path]:
    """The files holding ``base``'s artifacts. More than one when starts of this configuration
    compiled different graphs (other prompt counts, other epilogue forms): a save writes what its
    process holds, which need not include everything it loaded, so files are added, not replaced."""
    return sorted(base.parent.glob(f"{base.stem}.*.bin"))


def load(base: Path) -> int:
    """Load ``base``'s artifacts into this process's compile caches, before anything compiles;
    returns how many were loaded (0 without files, or when none can be used)."""
    import torch

    try:
        files = artifact_files(base)
    except OSError as exc:  # an unreadable folder must not stop the start
        log.warning("compile_cache_unusable", path=str(base.parent), error=f"{type(exc).__name__}: {exc}")
        return 0
    if not files:
        log.info("compile cache empty", path=str(base), detail="this start compiles; saved after warm-up")
        return 0
    loaded: set[tuple[str, str]] = set()
    for path in files:
        try:
            info = torch.compiler.load_cache_artifacts(path.read_bytes())
            if info is None:  # torch logs why and gives up on the file
                raise ValueError("torch could not read it (another torch build, or a damaged file)")
        except Exception as exc:  # a truncated or foreign file must not stop the start
            log.warning(
                "compile_cache_unusable",
                path=str(path),
                error=f"{type(exc).__name__}: {exc}",
                detail="removed at the next save",
            )
            _unusable.add(path)
            continue
        _known[path] = _keys(info)
        loaded |= _known[path]
        _touch(path)
    log.info("compile cache loaded", path=str(base), files=len(files), artifacts=len(loaded))
    return len(loaded)


def save(base: Path) -> int:
    """Write this process's compile artifacts as a new file of ``base``'s if they hold any that
    its files (as loaded here) lack; files the new one covers, and unusable ones, are removed.
    Returns the bytes written (0: nothing new, or it could not be written)."""
    import torch

    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # saving is a convenience: it must not fail a warm-up or a close
        log.warning("compile_cache_not_saved", path=str(base), error=f"{type(exc).__name__}: {exc}")
        return 0
    if saved is None:
        return 0
    data, info = saved
    keys = _keys(info)
    try:
        existing = artifact_files(base)
    except OSError:
        existing = []
    if not keys or keys <= set().union(*(_known.get(path, set()) for path in existing)):
        return 0
    digest = hashlib.sha256(repr(sorted(keys)).encode()).hexdigest()[:12]
    path = base.with_name(f"{base.stem}.{digest}.bin")
    if not _write(path, data):
        return 0
    _known[path] = keys
    log.info("compile cache saved", path=str(path), artifacts=len(keys), bytes=len(data))
    for other in existing:
        covered = other in _known and _known[other] <= keys
        if other != path and (covered or other in _unusable):
            _remove(other, "covered by the new file" if other in _known else "unusable")
            _known.pop(other, None)
            _unusable.discard(other)
    _prune_other_torch_builds(base)
    _remove_abandoned_temporaries(base)
    return len(data)


# A temporary file this old was left by a process killed while writing it (a live writer's is
# seconds old).
ABANDONED_S = 3600.0


def _remove_abandoned_temporaries(base: Path) -> None:
    try:
        now = time.time()
        abandoned = [
            tmp for tmp in base.parent.glob(f".{base.stem}.*.tmp") if now - tmp.stat().st_mtime > ABANDONED_S
        ]
    except OSError:
        return
    for tmp in abandoned:
        _remove(tmp, "left by an interrupted save")


def _remove(path: Path, reason: str) -> None:
    try:
        path.unlink()
    except OSError as exc:
        log.warning("compile_cache_not_pruned", path=str(path), error=f"{type(exc).__name__}: {exc}")
    else:
        log.info("compile cache pruned", path=str(path), reason=reason)


# Files of another torch build unused this long are removed at a save (a load touches what it
# loads): an upgrade would otherwise leave ~55 MB per configuration behind for good, and two
# builds sharing one engine directory would remove each other's files at every start.
UNUSED_S = 30 * 86400.0


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still loads; its files just age
        os.utime(path)


def _prune_other_torch_builds(base: Path) -> None:
    """Remove this configuration's files made by other torch builds and unused for UNUSED_S
    (only the build that made a file can load it)."""
    own, _, rest = base.name.partition("_")  # torch-<version>_<the configuration>.bin
    stem = Path(rest).stem
    try:
        now = time.time()
        stale = [
            other
            for pattern in (f"torch-*_{stem}.*.bin", f"torch-*_{stem}.choices.json")
            for other in base.parent.glob(pattern)
            if not other.name.startswith(f"{own}_") and now - other.stat().st_mtime > UNUSED_S
        ]
    except OSError:
        return
    for other in stale:
        _remove(other, "made by another torch build, unused for 30 days")


def choices_file(base: Path) -> Path:
    """Where the start-up choices of ``base``'s configuration are recorded."""
    return base.with_name(f"{base.stem}.choices.json")


def load_choices(path: Path) -> dict[str, bool]:
    """The choices recorded at ``path`` (names in CHOICES -> kept or not); {} without a usable file."""
    try:
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        log.warning(
            "compile_cache_choices_unusable",
            path=str(path),
            error=f"{type(exc).__name__}: {exc}",
            detail="the choices are timed again and the file replaced",
        )
        return {}
    if data.get("timing") != CHOICES_TIMING:
        log.info("start-up choices recorded were timed another way", path=str(path), detail="timing again")
        return {}
    chosen = {name: value for name, value in data.items() if name in CHOICES and isinstance(value, bool)}
    _touch(path)
    log.info("start-up choices recorded earlier", path=str(path), **chosen)
    return chosen


def save_choices(path: Path, choices: dict[str, bool]) -> bool:
    """Record ``choices`` at ``path``; False if it could not be written (a warning says why)."""
    recorded = {name: choices[name] for name in CHOICES if name in choices}
    data = json.dumps({"timing": CHOICES_TIMING, **recorded}, indent=2)
    return _write(path, (data + "\n").encode())


def _write(path: Path, data: bytes) -> bool:
    """Write ``data`` whole, then rename it into place: a start that reads the file meanwhile sees
    the old one or the new. A failure is a warning that names the path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from a service running as another user
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning(
            "compile_cache_not_saved",
            path=str(path),
            error=f"{type(exc).__name__}: {exc}",
            detail="the next start on a fresh machine compiles again",
        )
        return False
    return True
