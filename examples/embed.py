"""Embed the pipeline in your own asyncio application.

    python examples/embed.py configs/demo.toml --seconds 20
    python examples/embed.py my.toml --fake        # no engines needed: the fake backend

The pipeline runs inside this program's event loop; it installs no signal
handlers and no event loop policy, so it sits next to a web server, a rule
engine, or anything else. Reading ``p.results()`` is optional: unread results
are dropped (oldest first) instead of slowing the cameras down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from sam3stream.config import load_config
from sam3stream.errors import Sam3StreamError
from sam3stream.log import configure_logging
from sam3stream.runtime.fake import FakeBackend
from sam3stream.stream.pipeline import Pipeline


async def watch(config_path: Path, seconds: float, fake: bool) -> None:
    config = load_config(config_path)
    backend = FakeBackend(batch=max(8, config.batching.max_batch)) if fake else None
    async with Pipeline(config, backend=backend) as p:
        # Stop after `seconds` (or when every file camera has ended, whichever is first).
        stopper = asyncio.get_running_loop().call_later(seconds, p.request_stop)
        try:
            async for result in p.results():
                people = [d for d in result.detections if d.label == "person"]
                if people:
                    best = max(people, key=lambda d: d.score)
                    print(
                        f"{result.camera} #{result.seq}: {len(people)} person(s), best {best.score:.2f} "
                        f"at {tuple(round(v, 2) for v in best.box)}, {result.timing.end_to_end:.0f} ms"
                    )
        finally:
            stopper.cancel()
    print("camera states:", p.camera_states())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fake", action="store_true", help="use the fake backend instead of the engines")
    args = parser.parse_args()
    configure_logging("warning")  # your application's own logging setup goes here
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(watch(args.config, args.seconds, args.fake))
    except Sam3StreamError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
