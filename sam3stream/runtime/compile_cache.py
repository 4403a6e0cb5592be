"""torch.compile's artifacts kept in a folder (by default beside the engines), so that a start on a
machine whose own inductor cache is empty (a new container: that cache lives under /tmp) loads
the generated kernels instead of generating and compiling them again. Beside them, the start-up
choices the backend timed (epilogue forms, attention kernel): a restart takes them as recorded,
so it compiles the graphs that were saved and runs as the last start did (the timings are close
enough that they can draw differently from one start to the next).

The artifacts are keyed inside by the graphs they were made from, so a file from other code or
options is harmless: it is loaded and simply not hit. One file per torch build, GPU model,
resolution, batch, precision and compile mode keeps unrelated configurations apart. A cache that
cannot be read or written costs a warning, never the start.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHOICES",
    "cache_file",
    "choices_file",
    "device_label",
    "load",
    "load_choices",
    "save",
    "save_choices",
]

log = structlog.get_logger(__name__)

# path -> the artifacts (kind, key) it was loaded with or last saved with in this process: a
# save that adds none leaves the file alone (the serialised order varies, so bytes cannot tell).
_known: dict[Path, set[tuple[str, str]]] = {}

# The start-up choices a backend times and records (TorchBackend attributes of these names).
CHOICES = ("fused_gelu", "fused_relu", "attention_kernel")


def _keys(info: Any) -> set[tuple[str, str]]:
    return {(kind, key) for kind, keys in info.artifacts.items() for key in keys}


def device_label(device: torch.device) -> str:
    """The GPU model and compute capability (what compiled kernels depend on), or the device type."""
    import torch

    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"


def cache_file(
    folder: Path,
    *,
    torch_version: str,
    device: str,
    resolution: int,
    batch: int,
    precision: str,
    mode: str | None = None,
) -> Path:
    """Where the artifacts for one configuration live in ``folder``."""
    parts = [f"torch-{torch_version}", device, f"{resolution}x{batch}", precision]
    if mode:
        parts.append(mode)
    name = "_".join(re.sub(r"[^A-Za-z0-9.+]+", "-", part).strip("-").lower() for part in parts)
    return Path(folder) / f"{name}.bin"


def load(path: Path) -> int:
    """Load the artifacts saved at ``path`` into this process's compile caches, before anything
    compiles; returns how many were loaded (0 when there is no file or it cannot be used)."""
    import torch

    if not path.is_file():
        log.info("compile cache empty", path=str(path), detail="this start compiles; saved after warm-up")
        return 0
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
        if info is None:  # torch logs why and gives up on the file
            raise ValueError("torch could not read it (another torch build, or a damaged file)")
    except Exception as exc:  # a truncated or foreign file must not stop the start
        log.warning(
            "compile_cache_unusable",
            path=str(path),
            error=f"{type(exc).__name__}: {exc}",
            detail="this start compiles and replaces it after warm-up",
        )
        return 0
    _known[path] = _keys(info)
    log.info("compile cache loaded", path=str(path), artifacts=len(_known[path]), bytes=path.stat().st_size)
    return len(_known[path])


def save(path: Path) -> int:
    """Write this process's compile artifacts (those loaded included) to ``path`` if they differ
    from what it holds; returns the bytes written (0: nothing new, or it could not be written)."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, info = saved
    keys = _keys(info)
    if path in _known and keys <= _known[path] and path.is_file():
        return 0
    if not _write(path, data):
        return 0
    _known[path] = keys
    log.info("compile cache saved", path=str(path), artifacts=len(keys), bytes=len(data))
    _prune_other_torch_builds(path)
    return len(data)


def _prune_other_torch_builds(path: Path) -> None:
    """Remove this configuration's files made by other torch builds (an upgrade would otherwise
    leave ~55 MB each behind): only the running build can load them."""
    _, _, rest = path.name.partition("_")  # torch-<version>_<the configuration>.bin
    stale = [
        other
        for pattern in (f"torch-*_{rest}", f"torch-*_{Path(rest).stem}.choices.json")
        for other in path.parent.glob(pattern)
        if not other.name.startswith(path.name.partition("_")[0] + "_")
    ]
    for other in stale:
        try:
            other.unlink()
        except OSError as exc:
            log.warning("compile_cache_not_pruned", path=str(other), error=f"{type(exc).__name__}: {exc}")
        else:
            log.info("compile cache pruned", path=str(other), reason="made by another torch build")


def choices_file(cache: Path) -> Path:
    """Where the start-up choices that go with the artifacts at ``cache`` are recorded."""
    return cache.with_name(f"{cache.stem}.choices.json")


def load_choices(path: Path) -> dict[str, bool]:
    """The choices recorded at ``path`` (names in CHOICES -> kept or not); {} without a usable file."""
    if not path.is_file():
        return {}
    try:
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
    chosen = {name: value for name, value in data.items() if name in CHOICES and isinstance(value, bool)}
    log.info("start-up choices recorded earlier", path=str(path), **chosen)
    return chosen


def save_choices(path: Path, choices: dict[str, bool]) -> bool:
    """Record ``choices`` at ``path``; False if it could not be written (a warning says why)."""
    data = json.dumps({name: choices[name] for name in CHOICES if name in choices}, indent=2)
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
