"""The compile cache: names per configuration, fresh processes hitting what earlier ones compiled
(files added, not replaced), and trouble with the files costing a warning, not the start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

torch = pytest.importorskip("torch")

from sam3stream.runtime import compile_cache  # noqa: E402

# A process that loads the cache, compiles the named functions on the CPU, saves the cache and
# prints what it loaded and wrote, the inductor cache's hits and misses, and f's result.
_CHILD = """
import json, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from sam3stream.runtime import compile_cache
base = Path(sys.argv[1])
loaded = compile_cache.load(base)
forms = {
    "f": lambda x: torch.nn.functional.gelu(x @ x.T).sum(1),
    "g": lambda x: torch.relu(x * 3 - 1).amax(0),
    "h": lambda x: torch.tanh(x + x.T).mean(1),
}
x = torch.arange(64.0).reshape(8, 8) / 64
outs = {name: torch.compile(forms[name], dynamic=False)(x).tolist() for name in sys.argv[2:]}
written = compile_cache.save(base)
inductor = counters["inductor"]
print(json.dumps({"loaded": loaded, "written": written, "hits": inductor["fxgraph_cache_hit"],
                  "misses": inductor["fxgraph_cache_miss"], "outs": outs}))
"""

CONFIG = {
    "torch_version": "2.11.0+cu130",
    "device": "NVIDIA H200-sm90",
    "resolution": 1008,
    "batch": 8,
    "vision_chunk": 1,
    "decoder_frames": 1,
    "precision": "bf16",
}


def _child(base: Path, inductor_dir: Path, *names: str) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TRITON_CACHE_DIR": str(inductor_dir)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(base), *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _fake_artifacts(monkeypatch: pytest.MonkeyPatch, data: bytes, *keys: str) -> None:
    info = type("Info", (), {"artifacts": {"inductor": list(keys)}})()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (data, info))


def test_one_name_per_configuration() -> None:
    folder = Path("engines/compile-cache")
    first = compile_cache.cache_base(folder, **CONFIG)  # type: ignore[arg-type]
    assert first.parent == folder
    assert first.name == "torch-2.11.0+cu130_nvidia-h200-sm90_1008x8_c1d1_bf16.bin"
    changes = [
        ("torch_version", "2.12.0+cu130"),
        ("device", "NVIDIA L4-sm89"),
        ("resolution", 672),
        ("batch", 4),
        ("vision_chunk", 2),
        ("decoder_frames", 2),
        ("precision", "fp16"),
    ]
    others = [compile_cache.cache_base(folder, **{**CONFIG, k: v}) for k, v in changes]  # type: ignore[arg-type]
    moded = compile_cache.cache_base(folder, **CONFIG, mode="max-autotune-no-cudagraphs")  # type: ignore[arg-type]
    assert len({first, *others, moded}) == 9
    assert moded.name.endswith("_bf16_max-autotune-no-cudagraphs.bin")
    assert compile_cache.device_label(torch.device("cpu")) == "cpu"


def test_artifact_files_are_those_of_the_configuration(tmp_path: Path) -> None:
    base = compile_cache.cache_base(tmp_path, **CONFIG)  # type: ignore[arg-type]
    moded = compile_cache.cache_base(tmp_path, **CONFIG, mode="max-autotune")  # type: ignore[arg-type]
    ours = [base.with_name(f"{base.stem}.{n}.bin") for n in ("aaa", "bbb")]
    for path in [*ours, moded.with_name(f"{moded.stem}.ccc.bin"), compile_cache.choices_file(base)]:
        path.write_bytes(b"x")
    assert compile_cache.artifact_files(base) == ours


@pytest.mark.slow
def test_fresh_processes_hit_what_earlier_ones_compiled(tmp_path: Path) -> None:
    """Processes with empty inductor caches of their own: the first compiles f and g and saves;
    the second loads that, compiles g (a hit) and h, and adds a file (its save would not hold f);
    the third finds all three."""
    base = compile_cache.cache_base(tmp_path / "engines" / "compile-cache", **CONFIG)  # type: ignore[arg-type]
    first = _child(base, tmp_path / "inductor-a", "f", "g")
    assert first["loaded"] == 0 and first["misses"] >= 2 and first["hits"] == 0
    files = compile_cache.artifact_files(base)
    assert len(files) == 1 and first["written"] == files[0].stat().st_size > 0
    second = _child(base, tmp_path / "inductor-b", "g", "h")
    assert second["loaded"] >= 2 and second["hits"] >= 1 and second["misses"] >= 1 and second["written"] > 0
    assert len(compile_cache.artifact_files(base)) == 2
    third = _child(base, tmp_path / "inductor-c", "f", "g", "h")
    assert third["hits"] >= 3 and third["misses"] == 0
    assert third["written"] == 0  # nothing new: no file added
    assert len(compile_cache.artifact_files(base)) == 2
    np.testing.assert_allclose(third["outs"]["f"], first["outs"]["f"])


def test_an_unusable_file_is_a_warning_and_goes_at_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = compile_cache.cache_base(tmp_path, **CONFIG)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        assert compile_cache.load(base) == 0
    assert [e["event"] for e in logs] == ["compile cache empty"]
    damaged = base.with_name(f"{base.stem}.damaged.bin")
    damaged.write_bytes(b"not a cache")
    with structlog.testing.capture_logs() as logs:
        assert compile_cache.load(base) == 0
    assert [e["path"] for e in logs if e["event"] == "compile_cache_unusable"] == [str(damaged)]
    _fake_artifacts(monkeypatch, b"artifacts", "k1")
    assert compile_cache.save(base) > 0
    assert [p.suffix for p in compile_cache.artifact_files(base)] == [".bin"]
    assert not damaged.exists()


def test_an_unreadable_folder_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder this user may not read (made by another user under umask 077) must not stop a start."""
    base = compile_cache.cache_base(tmp_path, **CONFIG)  # type: ignore[arg-type]

    def denied(self: Path, *args: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "glob", denied)
    monkeypatch.setattr(Path, "is_file", denied)
    with structlog.testing.capture_logs() as logs:
        assert compile_cache.load(base) == 0
        assert compile_cache.load_choices(compile_cache.choices_file(base)) == {}
    assert [e["event"] for e in logs] == ["compile_cache_unusable", "compile_cache_choices_unusable"]


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine directory on a read-only or odd filesystem: the start goes on, the path named."""
    _fake_artifacts(monkeypatch, b"artifacts", "k1")
    blocker = tmp_path / "engines"
    blocker.write_text("a file where the folder should be")
    base = compile_cache.cache_base(blocker / "compile-cache", **CONFIG)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        assert compile_cache.save(base) == 0
    assert [e["event"] for e in logs] == ["compile_cache_not_saved"]
    good = compile_cache.cache_base(tmp_path / "ok", **CONFIG)  # type: ignore[arg-type]
    assert compile_cache.save(good) == len(b"artifacts")
    (written,) = compile_cache.artifact_files(good)
    assert written.read_bytes() == b"artifacts"
    assert compile_cache.save(good) == 0  # nothing new: nothing written
    assert [p.name for p in good.parent.iterdir()] == [written.name]  # no temporary left behind
    _fake_artifacts(monkeypatch, b"more artifacts", "k1", "k2")
    assert compile_cache.save(good) > 0  # a superset replaces the file it covers
    (replaced,) = compile_cache.artifact_files(good)
    assert replaced.read_bytes() == b"more artifacts"


def test_a_save_removes_other_torch_builds_files_of_the_configuration_once_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade's leftovers go once unused for UNUSED_S; a build that still loads its files
    (two builds sharing one engine directory) keeps them."""
    _fake_artifacts(monkeypatch, b"artifacts", "k1")
    old = compile_cache.cache_base(tmp_path, **{**CONFIG, "torch_version": "2.10.0+cu130"})  # type: ignore[arg-type]
    live = compile_cache.cache_base(tmp_path, **{**CONFIG, "torch_version": "2.12.0+cu130"})  # type: ignore[arg-type]
    other_config = compile_cache.cache_base(
        tmp_path,
        **{**CONFIG, "torch_version": "2.10.0+cu130", "batch": 4},  # type: ignore[arg-type]
    )
    stale = [old.with_name(f"{old.stem}.aaa.bin"), compile_cache.choices_file(old)]
    in_use = [live.with_name(f"{live.stem}.ccc.bin"), compile_cache.choices_file(live)]
    kept = other_config.with_name(f"{other_config.stem}.bbb.bin")
    long_ago = time.time() - 2 * compile_cache.UNUSED_S
    for path in (*stale, *in_use, kept):
        recorded = json.dumps({"timing": compile_cache.CHOICES_TIMING}).encode()
        path.write_bytes(recorded if path.suffix == ".json" else b"old")
        os.utime(path, (long_ago, long_ago))
    # The other build's process loads its files: that marks them used.
    nothing = type("Info", (), {"artifacts": {}})()
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: nothing)
    assert compile_cache.load(live) == 0
    compile_cache.load_choices(in_use[1])
    new = compile_cache.cache_base(tmp_path, **CONFIG)  # type: ignore[arg-type]
    assert compile_cache.save(new) > 0
    (written,) = compile_cache.artifact_files(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [written.name, kept.name, *(p.name for p in in_use)]
    )


def test_compiled_shapes_say_when_a_save_would_add_something() -> None:
    calls: list[tuple[int, ...]] = []
    shapes = compile_cache.CompiledShapes()
    step = shapes.track("step", lambda x, flag: calls.append(tuple(x.shape)) or x.sum())
    assert not shapes.new_since_save()
    assert float(step(torch.ones(2, 3), True)) == 6.0  # the step runs as given
    assert shapes.new_since_save()
    shapes.mark_saved()
    step(torch.zeros(2, 3), False)  # same shapes: a graph compiled before
    assert not shapes.new_since_save()
    step(torch.ones(3, 3), True)  # another prompt count, say
    assert shapes.new_since_save()
    other = shapes.track("other", lambda x, flag: x)
    shapes.mark_saved()
    other(torch.ones(3, 3), True)  # the same shapes in another step are another graph
    assert shapes.new_since_save()
    assert calls == [(2, 3), (2, 3), (3, 3)]


def test_start_up_choices_round_trip(tmp_path: Path) -> None:
    path = compile_cache.choices_file(tmp_path / "torch-2.11_h200_1008x8_bf16.bin")
    assert path.name == "torch-2.11_h200_1008x8_bf16.choices.json"
    assert compile_cache.load_choices(path) == {}
    chosen = {"fused_gelu": True, "fused_relu": False, "attention_kernel": True}
    assert compile_cache.save_choices(path, {**chosen, "unknown": True})
    assert compile_cache.load_choices(path) == chosen
    timing = compile_cache.CHOICES_TIMING
    path.write_text(json.dumps({"timing": timing, "fused_gelu": "yes", "fused_relu": False}))
    assert compile_cache.load_choices(path) == {"fused_relu": False}  # only booleans are taken
    path.write_text(json.dumps(chosen))  # timed the first way (plain calls): timed again
    assert compile_cache.load_choices(path) == {}


def test_a_save_removes_temporaries_an_interrupted_save_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_artifacts(monkeypatch, b"artifacts", "k1")
    base = compile_cache.cache_base(tmp_path, **CONFIG)  # type: ignore[arg-type]
    abandoned = tmp_path / f".{base.stem}.0123456789ab.bin.x1y2.tmp"
    live = tmp_path / f".{base.stem}.ba9876543210.bin.z3w4.tmp"  # another process writing now
    for tmp in (abandoned, live):
        tmp.write_bytes(b"partial")
    hours_ago = time.time() - 2 * compile_cache.ABANDONED_S
    os.utime(abandoned, (hours_ago, hours_ago))
    assert compile_cache.save(base) > 0
    assert not abandoned.exists() and live.exists()
