"""Embed the pipeline in your own asyncio application.

    python -m sam3stream demo                          # once: writes clips, engines and demo-out/demo.toml
    python examples/embed.py demo-out/demo.toml --seconds 20
    python examples/embed.py demo-out/demo.toml --fake # the fake backend: no model at all

The pipeline runs inside this program's event loop; it installs no signal
handlers and no event loop policy, so it sits next to a web server, a rule
engine, or anything else. Reading ``p.results()`` is optional: unread results
are dropped (oldest first) instead of slowing the cameras down.

The demo's model has random weights: its scores rarely reach the config's
``prompts.conf`` (0.3), so most frames print with no detections; ``--conf 0.2``
lowers the threshold for this run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
from pathlib import Path

import msgspec

from sam3stream.config import Config, load_config
from sam3stream.errors import Sam3StreamError
from sam3stream.runtime.fake import FakeBackend
from sam3stream.stream.pipeline import Pipeline


async def watch(config: Config, seconds: float, fake: bool) -> None:
    backend = None
    if fake:
        export = config.engines.export
        queries = export.queries if export is not None else 4
        backend = FakeBackend(batch=config.batching.max_batch, queries=queries)
    found: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[str] = collections.Counter()
    async with Pipeline(config, backend=backend) as p:
        # Stop after `seconds` (or when every file camera has ended, whichever is first).
        stopper = asyncio.get_running_loop().call_later(seconds, p.request_stop)
        try:
            async for result in p.results():
                frames[result.camera] += 1
                found[result.camera] += len(result.detections)
                if result.detections:
                    best = result.detections[0]  # best score first
                    print(
                        f"{result.camera} #{result.seq}: {len(result.detections)} detection(s), best "
                        f"{best.label} {best.score:.2f} at {tuple(round(v, 2) for v in best.box)}, "
                        f"{result.timing.end_to_end:.0f} ms after capture"
                    )
        finally:
            stopper.cancel()
    for camera, state in p.camera_states().items():
        error = p.camera_errors().get(camera)
        print(
            f"{camera}: {state}, {frames[camera]} frames, {found[camera]} detections"
            + (f" ({error})" if error else "")
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--conf", type=float, help="score threshold for this run (default: the config's)")
    parser.add_argument("--fake", action="store_true", help="use the fake backend instead of the engines")
    args = parser.parse_args()
    # Your application's own logging setup: the pipeline's events arrive as `sam3stream.*` loggers.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        if args.conf is not None:
            prompts = msgspec.structs.replace(config.prompts, conf=args.conf)
            config = msgspec.structs.replace(config, prompts=prompts)  # checked again by Pipeline
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(watch(config, args.seconds, args.fake))
    except Sam3StreamError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
