"""`sam3stream infer`: detections for still images, JSON + annotated PNG per image."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("infer", help="run the engines on images and write JSON + annotated PNGs")
    p.add_argument("--engines", type=Path, required=True, help="engine directory (from `sam3stream export`)")
    p.add_argument("--image", type=Path, action="append", default=[], required=True, help="repeatable")
    p.add_argument("--prompt", action="append", default=[], required=True, help="class name, repeatable")
    p.add_argument("--conf", type=float, default=0.3, help="score threshold (default 0.3)")
    p.add_argument(
        "--output",
        type=Path,
        default=Path("outputs/infer"),
        help="folder for <image>.json and <image>.png (default: outputs/infer)",
    )
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch", "tensorrt"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--no-draw", action="store_true", help="skip the annotated PNGs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sam3stream.config import DEVICE
    from sam3stream.errors import InputError
    from sam3stream.infer import run_infer
    from sam3stream.runtime.loader import open_backend

    if not DEVICE.match(args.device):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    backend = open_backend(args.backend, args.engines, args.device)
    try:
        report = run_infer(backend, args.image, args.prompt, args.conf, args.output, draw=not args.no_draw)
    finally:
        backend.close()
    for result in report.results:
        labels: dict[str, int] = {}
        for det in result.detections:
            labels[det.label] = labels.get(det.label, 0) + 1
        summary = ", ".join(f"{k}: {v}" for k, v in labels.items()) or "nothing above the threshold"
        print(f"{result.image} ({result.width}x{result.height}): {summary}")
    print("timing (ms): " + "  ".join(f"{k}={v:.1f}" for k, v in report.stage_ms.items()))
    print(f"wrote {len(report.outputs)} files to {args.output}")
    return 0
