"""`sam3stream build`: TensorRT plans from an ONNX engine directory (on the GPU that will run them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sam3stream.runtime.trt_plan import DEFAULT_MAX_CLASSES


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "build",
        help="build TensorRT plans from an ONNX engine directory",
        description=(
            "Build one TensorRT plan per graph (vision, geometry, decoder, text) from an engine directory "
            "made by `sam3stream export`. Run it on the machine (GPU model and TensorRT version) that will "
            "serve: plans do not move between TensorRT versions or GPU architectures."
        ),
    )
    p.add_argument(
        "engine_dir", type=Path, metavar="ENGINE_DIR", help="ONNX engine directory (sam3stream export)"
    )
    p.add_argument("--out", type=Path, help="where to write the plans (default ENGINE_DIR_trt_fp16 or _fp32)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", dest="precision", action="store_const", const="fp16", help="allow FP16 kernels (default)"
    )
    precision.add_argument(
        "--fp32", dest="precision", action="store_const", const="fp32", help="FP32 kernels only"
    )
    p.set_defaults(precision="fp16")
    p.add_argument(
        "--workspace-gb",
        type=float,
        default=None,
        help="builder workspace limit in GiB (default: TensorRT's)",
    )
    p.add_argument(
        "--max-classes",
        type=int,
        default=DEFAULT_MAX_CLASSES,
        help=f"most prompts a run may use (default {DEFAULT_MAX_CLASSES}); buffers are sized for it",
    )
    p.add_argument(
        "--opt-classes", type=int, help="class count the kernels are tuned for (default min(4, max))"
    )
    p.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default the engine batch)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sam3stream.runtime.tensorrt_build import build_engine_dir

    out = build_engine_dir(
        args.engine_dir,
        args.out,
        precision=args.precision,
        workspace_gb=args.workspace_gb,
        max_classes=args.max_classes,
        opt_classes=args.opt_classes,
        opt_batch=args.opt_batch,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    print(f"TensorRT engines written to {out}")
    print(f'use them with: [engines] dir = "{out}", backend = "tensorrt", device = "cuda"')
    return 0
