"""`sam3stream plan`: recommend a resolution for a card, camera count and FPS need."""

from __future__ import annotations

import argparse
from pathlib import Path

from sam3stream.plan import BUNDLED  # light: the planner imports nothing heavy


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("plan", help="recommend an input resolution for a card from benchmark results")
    p.add_argument("--vram-gb", type=float, required=True, help="GPU memory of the target card")
    p.add_argument("--cameras", type=int, default=8)
    p.add_argument("--min-fps", type=float, default=0.0, help="frames per second each camera needs")
    p.add_argument(
        "--objects",
        choices=["small", "large"],
        default="large",
        help="small: hands, tools (>= 840); large: people, counters (>= 560)",
    )
    p.add_argument(
        "--speed-ratio",
        type=float,
        default=1.0,
        help="target card's throughput relative to the benchmark GPU (e.g. 0.2)",
    )
    p.add_argument("--headroom", type=float, default=0.15, help="share of memory left for other processes")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--bench",
        type=Path,
        default=None,
        help="a `sam3stream bench` JSON (default: the bundled measurements, --measured-on)",
    )
    source.add_argument(
        "--measured-on",
        choices=list(BUNDLED),
        default="h200",
        help="which bundled table to plan from (default h200); --speed-ratio is relative to it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sam3stream.bench import measured_on
    from sam3stream.plan import format_plan, load_bench, plan

    bench = load_bench(args.bench, args.measured_on)
    candidates = plan(  # checks the flags before anything is printed
        bench,
        vram_gib=args.vram_gb,
        cameras=args.cameras,
        min_fps_per_camera=args.min_fps,
        objects=args.objects,
        speed_ratio=args.speed_ratio,
        headroom=args.headroom,
    )
    where = "; ".join(measured_on(bench)) or (
        str(args.bench) if args.bench else f"the bundled {args.measured_on.upper()} table"
    )
    print(f"measured on: {where}")
    if bench.get("complete") is False:
        print("note: an incomplete run (stopped part way): only the resolutions it measured")
    print(format_plan(candidates, args.cameras))
    return 0 if any(c.fits for c in candidates) else 1
