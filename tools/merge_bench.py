"""Merge several `sam3stream bench` JSON results (e.g. one per GPU session) into one report.

python tools/merge_bench.py docs/bench/h200_1008_840.json docs/bench/h200_672_560.json --out docs/bench/h200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sam3stream.bench import format_table, plot


def merge(paths: list[Path]) -> dict[str, Any]:
    parts = [json.loads(p.read_text()) for p in paths]
    return {
        "merged_from": [str(p) for p in paths],
        "commands": [p.get("command", "") for p in parts],
        "ours": sorted(
            (r for p in parts for r in p["ours"]), key=lambda r: (-r["resolution"], r.get("cameras", 0))
        ),
        "peer": sorted(
            (r for p in parts for r in p["peer"]), key=lambda r: (-r["resolution"], r.get("cameras", 0))
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="output stem (.json/.md/.png)")
    args = parser.parse_args()
    result = merge(args.inputs)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    commands = "\n".join(
        f"- `{c}` ({p})" for c, p in zip(result["commands"], result["merged_from"], strict=True)
    )
    args.out.with_suffix(".md").write_text(f"Merged from:\n{commands}\n\n" + format_table(result))
    plot(result, args.out.with_suffix(".png"))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
