"""The compile cache: one file per configuration, a round trip that lets a fresh process's compile
hit what another process compiled, and trouble with the file costing a warning, not the start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog

torch = pytest.importorskip("torch")

from sam3stream.runtime import compile_cache  # noqa: E402

# A process that loads the cache (if any), compiles a small function on the CPU, saves the cache
# and prints the inductor cache's hits and misses and the result.
_CHILD = """
import json, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from sam3stream.runtime import compile_cache
path = Path(sys.argv[1])
loaded = compile_cache.load(path)
f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T).sum(1), dynamic=False)
out = f(torch.arange(64.0).reshape(8, 8) / 64)
written = compile_cache.save(path)
inductor = counters["inductor"]
print(json.dumps({"loaded": loaded, "written": written, "hits": inductor["fxgraph_cache_hit"],
                  "misses": inductor["fxgraph_cache_miss"], "out": out.tolist()}))
"""


def _child(path: Path, inductor_dir: Path) -> dict[str, object]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_dir), "TRITON_CACHE_DIR": str(inductor_dir)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_one_file_per_configuration() -> None:
    base = {
        "torch_version": "2.11.0+cu130",
        "device": "NVIDIA H200-sm90",
        "resolution": 1008,
        "batch": 8,
        "precision": "bf16",
    }
    first = compile_cache.cache_file(Path("engines/compile-cache"), **base)  # type: ignore[arg-type]
    assert first.parent == Path("engines/compile-cache")
    assert first.name == "torch-2.11.0+cu130_nvidia-h200-sm90_1008x8_bf16.bin"
    others = [
        compile_cache.cache_file(Path("engines/compile-cache"), **{**base, key: value})  # type: ignore[arg-type]
        for key, value in [
            ("torch_version", "2.12.0+cu130"),
            ("device", "NVIDIA L4-sm89"),
            ("resolution", 672),
            ("batch", 4),
            ("precision", "fp16"),
        ]
    ]
    moded = compile_cache.cache_file(
        Path("c"),
        **base,  # type: ignore[arg-type]
        mode="max-autotune-no-cudagraphs",
    )
    assert len({first, *others}) == 6
    assert moded.name.endswith("_max-autotune-no-cudagraphs.bin")
    assert compile_cache.device_label(torch.device("cpu")) == "cpu"


@pytest.mark.slow
def test_a_fresh_process_hits_what_another_compiled(tmp_path: Path) -> None:
    """Two processes with empty inductor caches of their own: the first compiles and saves, the
    second loads the file and its compile is a cache hit with the same result."""
    path = tmp_path / "engines" / "compile-cache" / "cpu.bin"
    first = _child(path, tmp_path / "inductor-a")
    assert first["loaded"] == 0 and first["misses"] >= 1 and first["hits"] == 0
    assert first["written"] == path.stat().st_size > 0
    second = _child(path, tmp_path / "inductor-b")
    assert second["loaded"] >= 1 and second["hits"] >= 1 and second["misses"] == 0
    assert second["written"] == 0  # nothing new: the file is left as it was
    np.testing.assert_allclose(second["out"], first["out"])  # type: ignore[arg-type]


def test_an_unreadable_cache_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "cache.bin"
    path.write_bytes(b"not a cache")
    with structlog.testing.capture_logs() as logs:
        assert compile_cache.load(path) == 0
    assert [e["path"] for e in logs if e["event"] == "compile_cache_unusable"] == [str(path)]
    with structlog.testing.capture_logs() as logs:
        assert compile_cache.load(tmp_path / "none.bin") == 0
    assert [e["event"] for e in logs] == ["compile cache empty"]


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine directory on a read-only or odd filesystem: the start goes on, the path named."""
    info = type("Info", (), {"artifacts": {"inductor": ["k1"]}})()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", info))
    blocker = tmp_path / "engines"
    blocker.write_text("a file where the folder should be")
    path = blocker / "compile-cache" / "x.bin"
    with structlog.testing.capture_logs() as logs:
        assert compile_cache.save(path) == 0
    assert [e["path"] for e in logs if e["event"] == "compile_cache_not_saved"] == [str(path)]
    good = tmp_path / "ok" / "x.bin"
    assert compile_cache.save(good) == len(b"artifacts") and good.read_bytes() == b"artifacts"
    assert compile_cache.save(good) == 0  # unchanged: not rewritten
    assert [p.name for p in good.parent.iterdir()] == ["x.bin"]  # no temporary left behind


def test_start_up_choices_round_trip(tmp_path: Path) -> None:
    path = compile_cache.choices_file(tmp_path / "torch-2.11_h200_1008x8_bf16.bin")
    assert path.name == "torch-2.11_h200_1008x8_bf16.choices.json"
    assert compile_cache.load_choices(path) == {}
    chosen = {"fused_gelu": True, "fused_relu": False, "attention_kernel": True}
    assert compile_cache.save_choices(path, {**chosen, "unknown": True})
    assert compile_cache.load_choices(path) == chosen
    path.write_text(json.dumps({"fused_gelu": "yes", "fused_relu": False}))
    assert compile_cache.load_choices(path) == {"fused_relu": False}  # only booleans are taken


def test_a_save_removes_the_same_configurations_files_from_other_torch_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = type("Info", (), {"artifacts": {"inductor": ["k1"]}})()
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", info))
    config = {"device": "NVIDIA H200-sm90", "resolution": 1008, "batch": 8, "precision": "bf16"}
    old = compile_cache.cache_file(tmp_path, torch_version="2.10.0+cu130", **config)  # type: ignore[arg-type]
    other_config = compile_cache.cache_file(tmp_path, torch_version="2.10.0+cu130", **{**config, "batch": 4})  # type: ignore[arg-type]
    for stale in (old, compile_cache.choices_file(old), other_config):
        stale.write_bytes(b"old")
    new = compile_cache.cache_file(tmp_path, torch_version="2.11.0+cu130", **config)  # type: ignore[arg-type]
    assert compile_cache.save(new) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([new.name, other_config.name])
