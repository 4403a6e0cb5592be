"""`sam3stream bench`: per resolution and camera count, the GPU worker's throughput, latency and memory,
next to transformers' eager ``Sam3Model`` on the same weights, measured in the same run.

Each backend (a resolution and a camera group) runs in a child process (so memory figures are
that configuration's alone and an out-of-memory failure costs one row, not the run); the peer
runs in another child per resolution.
Results: JSON (every sample statistic), a markdown table and a plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AUTO_CHOICES",
    "BENCH_PROMPTS",
    "BenchArgs",
    "format_table",
    "measured_on",
    "output_path",
    "run_bench",
    "summarize_ms",
    "write_outputs",
]


# The prompts every bench run encodes, the first --classes of them.
BENCH_PROMPTS = [
    "person",
    "hand",
    "blow gun",
    "counter",
    "car",
    "dog",
    "cat",
    "tool",
    "box",
    "shelf",
    "cup",
    "chair",
]

# --fused-gelu and --attention-kernel on the command line -> TorchOptions (None: the backend
# times both forms at start and keeps the faster).
AUTO_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


@dataclass
class BenchArgs:
    resolutions: list[int]
    cameras: list[int]
    classes: int = 4
    queries: int = 50
    backend: str = "torch"
    engines: str | None = None  # an engine directory (one resolution) instead of --random
    random: str | None = "full"
    seed: int = 0
    precision: str = "bf16"
    iters: int = 20
    warmup: int = 3
    peer: bool = True
    peer_iters: int = 5
    compile_mode: str | None = None
    compile_cache: str | None = None  # a folder for torch.compile's artifacts (restarts)
    vision_chunk: int | None = None
    # Frames the backend is built for (`batching.max_batch` of a service); None: the most
    # cameras measured. A child measuring fewer cameras sizes its vision steps for them.
    engine_batch: int | None = None
    decoder_frames: int = 1
    query_precision: str = "same"
    overlap: bool = True
    fused_gelu: bool | None = None  # None: the backend times both forms
    channels_last: bool = True
    fused_decoder: bool = True
    attention_kernel: bool | None = None  # None: the backend times it against SDPA
    device: str = "cuda"
    out: str = "docs/bench/results"
    extra: dict[str, Any] = field(default_factory=dict)


def summarize_ms(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    return {
        "avg": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "min": float(a.min()),
        "n": float(a.size),
    }


def _child(kind: str, args: BenchArgs, resolution: int) -> list[dict[str, Any]]:
    """Run one resolution in a child process; rows come back as JSON lines on stdout."""
    payload = json.dumps({"kind": kind, "args": asdict(args), "resolution": resolution})
    cmd = [sys.executable, "-m", "sam3stream.bench_child", payload]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, check=False)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not rows:
        rows = [{"kind": kind, "resolution": resolution, "error": f"child exited with {proc.returncode}"}]
    return rows


def camera_groups(args: BenchArgs, resolution: int, engine_batch: int) -> list[list[int]]:
    """The camera counts that one backend measures as a service would run them: `sam3stream run`
    chooses the torch backend's vision chunk for min(max_batch, cameras), so camera counts that
    get different chunks (840 x 1: chunk 1, 840 x 8: chunk 2) need backends of their own."""
    cameras = sorted(args.cameras)
    if args.backend != "torch" or args.vision_chunk is not None:
        return [cameras]
    from sam3stream.runtime.torch_backend import default_vision_chunk

    groups: dict[int, list[int]] = {}
    for cams in cameras:
        groups.setdefault(default_vision_chunk(resolution, min(engine_batch, cams)), []).append(cams)
    return sorted(groups.values())


def run_bench(
    args: BenchArgs,
    progress: Any = print,
    on_step: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Every resolution in child processes (ours, one per camera group, then the peer).
    ``on_step`` gets the result so far (``complete`` false) after each child, so that a long run
    that is stopped or times out keeps the rows it measured."""
    started = time.time()
    ours: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []
    batch = args.engine_batch or max(args.cameras)
    children: list[tuple[str, list[dict[str, Any]], BenchArgs, int, str]] = []
    for resolution in args.resolutions:
        for group in camera_groups(args, resolution, batch):
            child_args = replace(args, cameras=group, engine_batch=batch)
            label = f"{args.backend} at {resolution}: cameras {group}"
            children.append(("ours", ours, child_args, resolution, label))
        if args.peer:
            children.append(("peer", peers, args, resolution, f"transformers eager peer at {resolution}"))
    for step, (kind, into, child_args, resolution, label) in enumerate(children, 1):
        progress(f"[{step}/{len(children)}] {label}")
        rows = _child(kind, child_args, resolution)
        into.extend(rows)
        for row in rows:
            progress("    " + _row_line(row))
        if on_step is not None and step < len(children):
            on_step(_result(args, started, ours, peers, complete=False))
    return _result(args, started, ours, peers, complete=True)


def _result(
    args: BenchArgs,
    started: float,
    ours: list[dict[str, Any]],
    peers: list[dict[str, Any]],
    *,
    complete: bool,
) -> dict[str, Any]:
    for row in ours:
        peer = next(
            (
                p
                for p in peers
                if p.get("resolution") == row.get("resolution") and p.get("cameras") == row.get("cameras")
            ),
            None,
        )
        if peer and "total_fps" in peer and "total_fps" in row:
            row["peer_total_fps"] = peer["total_fps"]
            row["speedup_vs_peer"] = row["total_fps"] / peer["total_fps"]
    return {
        "args": asdict(args),
        "command": " ".join(["sam3stream", "bench", *sys.argv[2:]]) if len(sys.argv) > 1 else "",
        "elapsed_s": time.time() - started,
        "complete": complete,
        "ours": ours,
        "peer": peers,
    }


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"r={row.get('resolution')} cams={row.get('cameras', '?')}: ERROR {row['error']}"
    mib = row.get("nvml_peak_mib") or row.get("alloc_peak_mib") or 0.0
    memory = f"peak {mib:.0f} MiB" if mib > 0 else "no GPU memory measured"
    return (
        f"r={row['resolution']} cams={row['cameras']}: {row['batch_ms']['p50']:.1f} ms/batch p50, "
        f"{row['total_fps']:.1f} frames/s, {memory}"
    )


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def format_table(result: dict[str, Any]) -> str:
    cols = [
        "res",
        "cams",
        "ms/batch avg",
        "p50",
        "p95",
        "ms/frame",
        "FPS/cam",
        "total FPS",
        "peer FPS",
        "x peer",
        "GPU MiB (nvml)",
        "alloc peak MiB",
        "buffers MiB",
        "MFU",
        "frames",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in result["ours"]:
        if "error" in r:
            lines.append(f"| {r.get('resolution')} | {r.get('cameras', '')} | error: {r['error']} |")
            continue
        bm = r["batch_ms"]
        cells = [
            str(r["resolution"]),
            str(r["cameras"]),
            f"{bm['avg']:.1f}",
            f"{bm['p50']:.1f}",
            f"{bm['p95']:.1f}",
            f"{r['frame_ms']:.2f}",
            f"{r['fps_per_camera']:.1f}",
            f"{r['total_fps']:.1f}",
            _fmt(r.get("peer_total_fps"), ".1f"),
            _fmt(r.get("speedup_vs_peer"), ".2f"),
            _fmt(r.get("nvml_peak_mib"), ".0f"),
            f"{r['alloc_peak_mib']:.0f}",
            f"{r['buffer_mib']:.0f}",
            _fmt(r.get("mfu"), ".0f", 100, "%"),
            str(r["frames"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    peak = next((r.get("matmul_tflops") for r in result["ours"] if r.get("matmul_tflops")), None)
    foot = f"\nDense bf16 matmul peak measured in the same run: {peak:.0f} TFLOP/s.\n" if peak else "\n"
    where = measured_on(result)
    if where:
        foot += f"\nMeasured on: {'; '.join(where)}.\n"
    return "\n".join(lines) + "\n" + foot


def measured_on(result: dict[str, Any]) -> list[str]:
    """The devices (with torch builds) that the rows of ``result`` name; [] for results written
    before rows named them."""
    rows = [*result.get("ours", []), *result.get("peer", [])]
    return sorted({f"{r['device']} (torch {r.get('torch', '?')})" for r in rows if r.get("device")})


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """FPS and memory against resolution, one line per camera count; None without matplotlib
    or without a measured row (every one failed)."""
    if not any("total_fps" in r for r in result["ours"]):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_fps, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for cams in sorted({r["cameras"] for r in result["ours"] if "cameras" in r}):
        rows = sorted(
            (r for r in result["ours"] if r.get("cameras") == cams and "total_fps" in r),
            key=lambda r: r["resolution"],
        )
        if not rows:
            continue
        res = [r["resolution"] for r in rows]
        ax_fps.plot(res, [r["total_fps"] for r in rows], "o-", label=f"sam3stream, {cams} cam")
        peers = [r.get("peer_total_fps") for r in rows]
        if all(peers):
            ax_fps.plot(res, peers, "x--", label=f"transformers eager, {cams} cam")
        mem = [r.get("nvml_peak_mib") or r["alloc_peak_mib"] for r in rows]
        ax_mem.plot(res, mem, "o-", label=f"{cams} cam")
    ax_fps.set(xlabel="input resolution", ylabel="frames/s (all cameras)", title="Throughput")
    ax_mem.set(xlabel="input resolution", ylabel="MiB", title="Peak process GPU memory")
    ax_mem.axhline(8 * 1024, color="grey", linestyle=":", label="8 GB card")
    for ax in (ax_fps, ax_mem):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def output_path(out: Path, suffix: str) -> Path:
    """``out`` is a stem: ``run`` and ``run.json`` give ``run.json``; ``run.v2`` gives
    ``run.v2.json`` (a dot in a name is not taken for a suffix to replace)."""
    stem = out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out
    return stem.with_name(stem.name + suffix)


def write_outputs(result: dict[str, Any], out: Path, *, draw: bool = True) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [output_path(out, ".json"), output_path(out, ".md")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    cmd = result.get("command", "")
    note = "" if result.get("complete", True) else "Incomplete: the rows measured before the run stopped.\n\n"
    paths[1].write_text(f"Command: `{cmd}`\n\n{note}" + format_table(result))
    png = plot(result, output_path(out, ".png")) if draw else None
    if png:
        paths.append(png)
    else:  # an older run's plot would sit beside these rows as if it were theirs
        output_path(out, ".png").unlink(missing_ok=True)
    return paths
