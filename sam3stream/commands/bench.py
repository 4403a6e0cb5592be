"""`sam3stream bench`: GPU worker throughput, latency and memory per resolution and camera count."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sam3stream.bench import AUTO_CHOICES, BENCH_PROMPTS
from sam3stream.config import DEVICE
from sam3stream.errors import InputError
from sam3stream.folders import make_writable_folder
from sam3stream.resolution import check_resolution

DEFAULT_RESOLUTIONS = (1008, 840, 672, 560)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("bench", help="benchmark the GPU worker against transformers' eager Sam3Model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--engines", type=Path, help="an engine directory (its resolution is used)")
    src.add_argument("--random", choices=["tiny", "full"], default="full", help="random weights of this size")
    p.add_argument(
        "--resolution",
        type=int,
        nargs="+",
        help=f"default {' '.join(map(str, DEFAULT_RESOLUTIONS))}; with --engines, the directory's",
    )
    p.add_argument(
        "--cameras", type=int, nargs="+", default=[1, 8], help="camera counts: frames per batch measured"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        help="the batch the backend is built for, as batching.max_batch in a service "
        "(default: the most --cameras; with --engines, the directory's batch)",
    )
    p.add_argument("--classes", type=int, default=4, help=f"prompts per frame, 1..{len(BENCH_PROMPTS)}")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnxruntime", "tensorrt"],
        help="torch builds from --random or --engines; onnxruntime and tensorrt run --engines",
    )
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-peer", action="store_true", help="skip transformers' eager Sam3Model")
    p.add_argument("--peer-iters", type=int, default=5)
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="a folder for torch.compile's artifacts: loaded before the warm-up, saved after it "
        "(an engine directory's runs use <dir>/compile-cache)",
    )
    p.add_argument("--vision-chunk", type=int, default=None)
    p.add_argument("--decoder-frames", type=int, default=1)
    p.add_argument(
        "--query-precision",
        default="same",
        choices=["fp32", "same"],
        help="decoder attention at --precision (default; box refinement stays float32) or all float32",
    )
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each frame's decoder on a second CUDA stream beside the next frames' vision steps",
    )
    p.add_argument(
        "--fused-gelu",
        choices=list(AUTO_CHOICES),
        default="auto",
        help="the ViT MLP's GELU (tanh form) in its first GEMM's epilogue; auto: timed at start",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="convolutions and FPN buffers in channels-last layout",
    )
    p.add_argument(
        "--fused-decoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decoder GroupNorm statistics and encoder ReLUs in fewer kernels (compiled CUDA)",
    )
    p.add_argument(
        "--attention-kernel",
        choices=list(AUTO_CHOICES),
        default="auto",
        help="the DETR encoder's self-attention through the Triton kernel; auto: timed at start",
    )
    p.add_argument(
        "--out", type=Path, default=Path("docs/bench/results"), help="output stem (.json/.md/.png)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sam3stream.bench import BenchArgs, format_table, output_path, run_bench, write_outputs

    _check_counts(args)
    if args.engines is None and args.backend != "torch":
        what = "sam3stream build DIR" if args.backend == "tensorrt" else "sam3stream export"
        raise InputError(
            f"--backend {args.backend} runs an engine directory: pass --engines DIR (made by {what}); "
            "--random builds the torch backend"
        )
    if not DEVICE.match(args.device):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    _check_writable(args.out)
    resolutions = [check_resolution(r, "--resolution") for r in args.resolution or DEFAULT_RESOLUTIONS]
    engine_batch = args.max_batch
    if args.engines is not None:
        from sam3stream.runtime.manifest import read_manifest

        manifest = read_manifest(args.engines)
        if args.max_batch is not None:
            raise InputError(
                f"--max-batch applies to --random; {args.engines} was exported for batch {manifest.batch}"
            )
        if args.compile_cache is not None:
            raise InputError(
                f"--compile-cache applies to --random; runs of {args.engines} use its own compile-cache "
                "folder (remove it to measure a start without the cache)"
            )
        if args.resolution is not None and resolutions != [manifest.resolution]:
            raise InputError(
                f"--resolution {' '.join(map(str, resolutions))}: {args.engines} runs at "
                f"{manifest.resolution} only (export another directory for another resolution)"
            )
        resolutions, engine_batch = [manifest.resolution], manifest.batch
    if engine_batch is not None and max(args.cameras) > engine_batch:
        where = f"{args.engines} takes" if args.engines is not None else "--max-batch is"
        raise InputError(f"--cameras {max(args.cameras)}: {where} at most {engine_batch} frames per batch")
    bench_args = BenchArgs(
        resolutions=resolutions,
        cameras=sorted(set(args.cameras)),
        classes=args.classes,
        queries=args.queries,
        backend=args.backend,
        engines=str(args.engines) if args.engines else None,
        random=None if args.engines else args.random,
        precision=args.precision,
        iters=args.iters,
        warmup=args.warmup,
        peer=not args.no_peer and args.engines is None,
        peer_iters=args.peer_iters,
        compile_mode=args.compile_mode,
        compile_cache=str(args.compile_cache) if args.compile_cache else None,
        vision_chunk=args.vision_chunk,
        engine_batch=engine_batch,
        decoder_frames=args.decoder_frames,
        query_precision=args.query_precision,
        overlap=args.overlap,
        fused_gelu=AUTO_CHOICES[args.fused_gelu],
        channels_last=args.channels_last,
        fused_decoder=args.fused_decoder,
        attention_kernel=AUTO_CHOICES[args.attention_kernel],
        device=args.device,
        out=str(args.out),
    )

    def on_step(partial: dict[str, Any]) -> None:
        if any("error" not in row for row in partial["ours"]):  # never a good file by an empty one
            write_outputs(partial, args.out, draw=False)

    try:
        result = run_bench(
            bench_args, progress=lambda m: print(m, file=sys.stderr, flush=True), on_step=on_step
        )
    except KeyboardInterrupt:
        where = f"{output_path(args.out, '.json')} and .md"
        print(f"stopped: the rows measured before, if any, are in {where}", file=sys.stderr)
        raise
    print(format_table(result))
    failed = [row for row in result["ours"] if "error" in row]
    if len(failed) < len(result["ours"]):
        paths = write_outputs(result, args.out)
        print("wrote " + ", ".join(str(p) for p in paths))
    else:
        print(f"nothing measured: {args.out}.* left as it was", file=sys.stderr)
    if failed:  # a peer that ran out of memory is reported in the table; ours failing is a failure
        print(
            f"{len(failed)} of {len(result['ours'])} measurements failed; the first: {failed[0]['error']}",
            file=sys.stderr,
        )
        return 1
    return 0


def _check_writable(out: Path) -> None:
    """Before minutes of measuring: the output stem's folder can be made and written to."""
    folder = out.parent
    try:
        make_writable_folder(folder)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write in {folder} ({exc.strerror or exc})") from None


def _check_counts(args: argparse.Namespace) -> None:
    """Every count names its flag when it is out of range (not a traceback from the child)."""
    lows = {
        "--cameras": (min(args.cameras), 1),
        "--classes": (args.classes, 1),
        "--queries": (args.queries, 1),
        "--iters": (args.iters, 1),
        "--warmup": (args.warmup, 0),
        "--peer-iters": (args.peer_iters, 1),
        "--decoder-frames": (args.decoder_frames, 1),
        "--vision-chunk": (args.vision_chunk if args.vision_chunk is not None else 1, 1),
        "--max-batch": (args.max_batch if args.max_batch is not None else 1, 1),
    }
    for flag, (value, low) in lows.items():
        if value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if args.classes > len(BENCH_PROMPTS):
        raise InputError(
            f"--classes must be <= {len(BENCH_PROMPTS)} (the bench's prompt list), got {args.classes}"
        )
