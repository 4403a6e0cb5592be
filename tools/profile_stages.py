"""Where the GPU time goes: per-stage times (each stage compiled on its own, CUDA events on module
hooks; ``--eager`` adds the uncompiled split) and the top kernels of the compiled backend
(torch.profiler, CUDA graphs off so kernels are visible). ``--graphs`` instead times the default
backend's captured vision and decoder graphs alone and lists each step's kernels by category.

    python tools/profile_stages.py --resolution 1008 --cameras 8 --out docs/bench/profile_1008
    python tools/profile_stages.py --resolution 1008 --cameras 8 --graphs --out docs/bench/graphs_1008
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sam3stream.bench import AUTO_CHOICES


def stage_modules(backend: Any) -> dict[str, Any]:
    """The modules whose calls are timed, by stage name (ModuleLists: every member)."""
    decoder = backend._decoder
    return {
        "vit": backend._vision.backbone,
        "fpn": backend._vision.fpn_layers,
        "geometry": backend._geometry,
        "detr_encoder": decoder.detr_encoder,
        "detr_decoder_layers": decoder.detr_decoder.layers,
        "box_head": decoder.detr_decoder.box_head,
        "scoring": decoder.scoring,
        "mask_cross_attn": decoder.prompt_cross_attn,
        "pixel_decoder_convs": decoder.pixel_decoder.conv_layers,
        "mask_embed": decoder.mask_embedder,
        "instance_projection": decoder.instance_projection,
        "vision_total": backend._vision,
        "decoder_total": decoder,
    }


def compile_stages(backend: Any) -> None:
    """torch.compile each timed module's forward on its own, so the module hooks stay outside the
    compiled code and the CUDA events split compiled kernels by stage (the glue stays eager)."""
    import torch

    for name, module in stage_modules(backend).items():
        if name.endswith("_total"):
            continue
        modules = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        for mod in modules:
            mod.forward = torch.compile(mod.forward, dynamic=False)


def stage_times(backend: Any, text: Any, frames: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per stage for one batch, from CUDA events around each module call."""
    import torch

    parts = stage_modules(backend)
    totals: dict[str, float] = defaultdict(float)
    pending: list[tuple[str, Any, Any]] = []
    handles = []
    for name, module in parts.items():
        modules = list(module) if isinstance(module, torch.nn.ModuleList) else [module]
        for mod in modules:

            def pre(_m: Any, _i: Any, name: str = name) -> None:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
                pending.append((name, start, None))

            def post(_m: Any, _i: Any, _o: Any, name: str = name) -> None:
                for idx in range(len(pending) - 1, -1, -1):
                    if pending[idx][0] == name and pending[idx][2] is None:
                        end = torch.cuda.Event(enable_timing=True)
                        end.record()
                        pending[idx] = (name, pending[idx][1], end)
                        break

            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
    backend.infer(frames, text, 0.3)
    torch.cuda.synchronize()
    pending.clear()
    for _ in range(repeats):
        backend.infer(frames, text, 0.3)
    torch.cuda.synchronize()
    for name, start, end in pending:
        if end is not None:
            totals[name] += start.elapsed_time(end) / repeats
    for handle in handles:
        handle.remove()
    return dict(totals)


def kernel_rows(prof: Any, limit: int = 60) -> list[dict[str, Any]]:
    """The top GPU kernels by total time, with their full names (the table truncates them)."""
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if total > 0:
            rows.append({"name": event.key, "ms": total / 1e3, "calls": event.count})
    rows.sort(key=lambda row: -row["ms"])
    return rows[:limit]


# Kernel families by name; the first match wins (inductor's own kernels carry op names such as
# "scaled_dot_product_cudnn_attention" in theirs, so they are matched first).
CATEGORIES = [
    ("triton (fused pointwise/reductions)", re.compile(r"^triton_")),
    ("attention", re.compile(r"fmha|flash|sdpa|attention", re.I)),
    ("gemm", re.compile(r"nvjet|gemm|cublas", re.I)),
    ("convolution", re.compile(r"conv|fprop|dgrad|implicit", re.I)),
    ("layout", re.compile(r"nchwToNhwc|nhwcToNchw|transpose", re.I)),
]


def categorize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Milliseconds per kernel family."""
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        family = next((name for name, rx in CATEGORIES if rx.search(row["name"])), "other")
        totals[family] += row["ms"]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def graph_split(backend: Any, text: Any, frames: np.ndarray, repeats: int = 10) -> dict[str, Any]:
    """The captured graphs timed alone (median ms per batch over ``repeats``), then each step's
    compiled kernels outside the graphs (one call each, torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sam3stream.bench_child import submit_ahead_ms
    from sam3stream.runtime.cuda_timing import median_cuda_ms

    batch = frames.shape[0]
    for _ in range(3):  # both frame buffers' graphs captured
        backend.infer(frames, text, 0.3)
    torch.cuda.synchronize()

    def vision() -> None:
        for start in range(0, batch, backend.vision_chunk):
            backend._vision_graphs[(backend._turn, start)].replay()

    def decoder() -> None:
        for start in range(0, batch, backend.decoder_frames):
            backend._decoder_graphs[start].replay()

    def whole() -> None:
        backend.infer(frames, text, 0.3)

    with torch.no_grad():
        report: dict[str, Any] = {
            "vision_graphs_ms": median_cuda_ms(vision, repeats),
            "decoder_graphs_ms": median_cuda_ms(decoder, repeats),
            "infer_ms": median_cuda_ms(whole, repeats),
        }
        # As the worker runs: batch n+1 queued before batch n is collected.
        report["pipelined_ms"] = statistics.median(submit_ahead_ms(backend, frames, text, 3 * repeats))
        for name, step in (
            ("vision_step", lambda: backend._run_vision_slot(0)),
            ("decoder_step", lambda: backend._run_decoder_slot(0)),
        ):
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            rows = kernel_rows(prof, limit=400)
            report[name] = {
                "frames": backend.vision_chunk if name == "vision_step" else backend.decoder_frames,
                "kernel_ms": sum(row["ms"] for row in rows),
                "kernel_count": sum(row["calls"] for row in rows),
                "by_family_ms": categorize(rows),
                "top": rows[:60],
            }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=1008)
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="also time the stages uncompiled")
    parser.add_argument("--no-kernels", action="store_true", help="skip the compiled kernel table")
    parser.add_argument("--kernels-only", action="store_true", help="skip the stage split")
    parser.add_argument(
        "--graphs", action="store_true", help="time the default backend's captured graphs by step, then exit"
    )
    parser.add_argument("--fused-gelu", choices=list(AUTO_CHOICES), default="auto")
    parser.add_argument("--fused-decoder", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/profile"))
    args = parser.parse_args()
    from sam3stream.runtime.cuda_timing import require_cuda

    require_cuda("tools/profile_stages.py")

    import torch
    from torch.profiler import ProfilerActivity, profile

    from sam3stream.bench import BENCH_PROMPTS, BenchArgs
    from sam3stream.bench_child import _random_loaded
    from sam3stream.model.roi_align import install_into_transformers
    from sam3stream.runtime.torch_backend import TorchBackend, TorchOptions

    install_into_transformers()
    bargs = BenchArgs(resolutions=[args.resolution], cameras=[args.cameras])
    frames = np.random.default_rng(0).integers(
        0, 256, (args.cameras, args.resolution, args.resolution, 3), dtype=np.uint8
    )
    report: dict[str, Any] = {"command": "python tools/profile_stages.py " + " ".join(sys.argv[1:])}

    def backend(options: TorchOptions) -> TorchBackend:
        return TorchBackend.from_model(
            _random_loaded(bargs, args.resolution, "cuda"),
            resolution=args.resolution,
            batch=args.cameras,
            queries=50,
            options=options,
        )

    gelu = AUTO_CHOICES[args.fused_gelu]
    if args.graphs:
        default = backend(TorchOptions(fused_gelu=gelu, fused_decoder=args.fused_decoder))
        report.update(graph_split(default, default.encode_text(BENCH_PROMPTS[: args.classes]), frames))
        report["vision_chunk"], report["fused_gelu"] = default.vision_chunk, default.fused_gelu
        report["fused_decoder"], report["fused_relu"] = default.fused_decoder, default.fused_relu
        report["attention_kernel"] = default.attention_kernel
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        return 0
    plain = TorchOptions(compile=False, cuda_graphs=False, fused_gelu=gelu)
    staged = backend(plain)
    text = staged.encode_text(BENCH_PROMPTS[: args.classes])
    if args.eager:
        report["eager_stage_ms_per_batch"] = stage_times(staged, text, frames)
    if not args.kernels_only:
        compile_stages(staged)
        report["compiled_stage_ms_per_batch"] = stage_times(staged, text, frames)
        print(json.dumps(report, indent=2), flush=True)
    staged.close()
    del staged
    torch.cuda.empty_cache()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.no_kernels:
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        return 0
    compiled = backend(TorchOptions(cuda_graphs=False, fused_gelu=gelu))
    for _ in range(3):
        compiled.infer(frames, text, 0.3)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled.infer(frames, text, 0.3)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    report["compiled_last_timings_ms"] = compiled.last_timings
    report["kernels"] = kernel_rows(prof)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(table + "\n")
    print(json.dumps(report, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
