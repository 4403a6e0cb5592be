"""`sam3stream demo`: tiny random model, synthetic clips, eight file cameras on the CPU, a summary.

Everything it needs is made on first use and cached: the engines (exported from
a seeded random tiny model, about a minute), the clips (under ``--out``/clips)
and the config (``--out``/demo.toml, which ``sam3stream run`` can replay). Each
run starts the JSONL and video folders under ``--out`` afresh.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo", help="run a tiny random model on synthetic clips from 8 file cameras and print a summary"
    )
    p.add_argument("--seconds", type=float, default=10.0, help="run time after the engine loads (default 10)")
    p.add_argument("--cameras", type=int, default=8, help="file cameras, the clips cycled (default 8)")
    p.add_argument("--resolution", type=int, default=448, help="model input size to export at (default 448)")
    p.add_argument(
        "--out", type=Path, default=Path("demo-out"), help="clips, config, outputs (default demo-out)"
    )
    p.add_argument("--engines", type=Path, help="engine directory (default engines/b8_q50_r{resolution})")
    p.add_argument("--mqtt", metavar="HOST[:PORT]", help="also publish to this MQTT broker")
    p.add_argument(
        "--conf",
        type=float,
        help="one score threshold for every class (default: measured on a random model, else 0.3)",
    )
    p.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="stderr logs"
    )
    p.set_defaults(func=run)


def parse_host_port(value: str, default_port: int = 1883) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6addr]:port``."""
    from sam3stream.errors import InputError

    host, sep, port = value.rpartition(":")
    if not sep or (host.count(":") and not host.endswith("]")):  # no port, or a bare IPv6 address
        host, port = value, str(default_port)
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(f"--mqtt: expected HOST or HOST:PORT, got {value!r}")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    from sam3stream.commands.run import run_loop
    from sam3stream.demo.clips import DEFAULT_CLIPS, ensure_clips
    from sam3stream.demo.config import (
        CPU_MAX_BATCH,
        PROMPTS,
        DemoLayout,
        assign_clips,
        demo_config_text,
        write_demo_config,
    )
    from sam3stream.demo.engines import (
        DEMO_BATCH,
        DEMO_QUERIES,
        calibrate_thresholds,
        ensure_engines,
        is_random,
    )
    from sam3stream.demo.run import RunOutcome, run_pipeline
    from sam3stream.demo.summary import SummaryContext, format_summary
    from sam3stream.errors import InputError
    from sam3stream.log import configure_logging
    from sam3stream.resolution import check_resolution

    configure_logging(args.log_level)
    resolution = check_resolution(args.resolution, "--resolution")
    if args.cameras < 1:
        raise InputError(f"--cameras: give at least 1, got {args.cameras}")
    if not args.seconds > 0:
        raise InputError(f"--seconds: must be above 0, got {args.seconds}")
    if args.conf is not None and not 0 <= args.conf <= 1:
        raise InputError(f"--conf: must be in 0..1, got {args.conf}")
    mqtt = parse_host_port(args.mqtt) if args.mqtt else None
    layout = DemoLayout(args.out)
    # The naming of sam3stream.model.export.default_engine_dir (not imported: it pulls in torch).
    engine_dir: Path = args.engines or Path("engines") / f"b{DEMO_BATCH}_q{DEMO_QUERIES}_r{resolution}"

    manifest = ensure_engines(engine_dir, resolution)
    clips = ensure_clips(layout.clips, DEFAULT_CLIPS[: args.cameras], progress=_say)
    random_model = is_random(manifest)
    thresholds = {}
    if args.conf is None and random_model:
        _say("measuring the random model's scores for the thresholds")
        thresholds = calibrate_thresholds(engine_dir, clips, PROMPTS)
    conf = args.conf if args.conf is not None else (min(thresholds.values()) if thresholds else 0.3)
    text = demo_config_text(
        cameras=assign_clips(clips, args.cameras),
        engine_dir=engine_dir,
        layout=layout,
        max_batch=min(CPU_MAX_BATCH, manifest.batch),
        mask_size=(DEFAULT_CLIPS[0].width // 4, DEFAULT_CLIPS[0].height // 4),
        draw_masks=not random_model,
        conf=conf,
        thresholds=thresholds,
        mqtt=mqtt,
    )
    config = write_demo_config(layout.config, text)
    layout.clear_results()
    _say(f"running {args.cameras} cameras for up to {args.seconds:g} s ({config.summary()})")
    outcomes: list[RunOutcome] = []

    async def main() -> int:
        outcomes.append(await run_pipeline(config, args.seconds))
        return 0

    try:
        run_loop(main)
    except asyncio.CancelledError:
        print("error: stopped by a second Ctrl-C without draining", file=sys.stderr)
        return 130
    outcome = outcomes[0]
    context = SummaryContext(
        config=config,
        manifest=manifest,
        engine_dir=engine_dir,
        layout=layout,
        seconds=args.seconds,
        random_model=random_model,
        thresholds=thresholds,
    )
    print(format_summary(context, outcome), flush=True)
    processed = sum(c["frames_processed"] for c in outcome.snapshot["cameras"].values())
    return 0 if processed > 0 else 1


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
