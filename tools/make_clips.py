"""Write the demo's synthetic test clips (shapes bouncing over scikit-image's sample photos).

    python tools/make_clips.py --out demo-out/clips
    python tools/make_clips.py --out /tmp/clips --width 1280 --height 720 --seconds 10 --force

Clips already there are kept, whatever size they were written at, unless --force is given
(each kept clip is named as kept).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from sam3stream.demo.clips import DEFAULT_CLIPS, ensure_clips
from sam3stream.log import configure_logging


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out/clips"))
    parser.add_argument("--width", type=int, default=DEFAULT_CLIPS[0].width)
    parser.add_argument("--height", type=int, default=DEFAULT_CLIPS[0].height)
    parser.add_argument("--fps", type=int, default=DEFAULT_CLIPS[0].fps)
    parser.add_argument("--seconds", type=float, default=DEFAULT_CLIPS[0].seconds)
    parser.add_argument(
        "--count",
        type=int,
        default=len(DEFAULT_CLIPS),
        help=f"how many of the {len(DEFAULT_CLIPS)} clips (each over its own sample photo)",
    )
    parser.add_argument("--force", action="store_true", help="write the clips again even if they exist")
    args = parser.parse_args()
    configure_logging("warning")
    if not 1 <= args.count <= len(DEFAULT_CLIPS):
        parser.error(f"--count must be 1..{len(DEFAULT_CLIPS)} (the clips there are), got {args.count}")
    try:
        specs = [
            replace(spec, width=args.width, height=args.height, fps=args.fps, seconds=args.seconds)
            for spec in DEFAULT_CLIPS[: args.count]
        ]
    except ValueError as exc:
        parser.error(str(exc))
    if args.force:
        for spec in specs:
            (args.out / f"{spec.name}.mp4").unlink(missing_ok=True)
    for path in ensure_clips(args.out, specs, progress=print):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
