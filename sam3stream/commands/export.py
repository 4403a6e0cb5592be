"""`sam3stream export`: split SAM 3 and export ONNX graphs plus manifest.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sam3stream.resolution import check_resolution


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("export", help="export the vision/text/geometry/decoder graphs to ONNX")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="checkpoint directory in the facebook/sam3 layout")
    src.add_argument("--random", choices=["tiny", "full"], help="a seeded random model of this size")
    p.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    p.add_argument("--resolution", type=int, required=True, help="input size, a multiple of 14 in 448..1344")
    p.add_argument("--batch", type=int, default=8, help="largest frame batch the graphs take (default 8)")
    p.add_argument(
        "--queries", type=int, default=50, help="top-K queries kept per frame and class (default 50)"
    )
    p.add_argument(
        "--out", type=Path, help="engine directory (default engines/b{batch}_q{queries}_r{resolution})"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sam3stream.model.export import default_engine_dir, export_engines

    resolution = check_resolution(args.resolution, "--resolution")
    out = args.out or default_engine_dir(args.batch, args.queries, resolution)
    path = export_engines(
        random=args.random,
        checkpoint=args.checkpoint,
        resolution=resolution,
        batch=args.batch,
        queries=args.queries,
        out=out,
        seed=args.seed,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(f"engines written to {path}")
    return 0
