"""Merge several `sam3stream bench` JSON results (e.g. one per GPU session) into one report.

A later file's row replaces an earlier file's row for the same resolution and camera count
(e.g. one-camera rows measured on a backend sized for one camera, over the one-camera rows of
an 8-camera run); the report lists what was replaced.

python tools/merge_bench.py docs/bench/h200_1008_840.json docs/bench/h200_672_560.json --out docs/bench/h200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sam3stream.bench import format_table, plot


def _latest(rows: list[tuple[str, dict[str, Any]]], replaced: list[str]) -> list[dict[str, Any]]:
    """One row per (resolution, cameras): the last file's; the replaced ones are noted."""
    kept: dict[tuple[Any, Any], tuple[str, dict[str, Any]]] = {}
    for source, row in rows:
        key = (row["resolution"], row.get("cameras"))
        if key in kept:
            replaced.append(f"{row.get('kind', 'ours')} {key[0]} x {key[1]}: {kept[key][0]} -> {source}")
        kept[key] = (source, row)
    return sorted((row for _, row in kept.values()), key=lambda r: (-r["resolution"], r.get("cameras", 0)))


def merge(paths: list[Path]) -> dict[str, Any]:
    parts = [(str(p), json.loads(p.read_text())) for p in paths]
    replaced: list[str] = []
    return {
        "merged_from": [source for source, _ in parts],
        "commands": [part.get("command", "") for _, part in parts],
        "ours": _latest([(source, r) for source, part in parts for r in part["ours"]], replaced),
        "peer": _latest([(source, r) for source, part in parts for r in part["peer"]], replaced),
        "replaced": replaced,
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
    replaced = "".join(f"- {line}\n" for line in result["replaced"])
    replaced = f"Rows replaced by a later file:\n{replaced}\n" if replaced else ""
    args.out.with_suffix(".md").write_text(f"Merged from:\n{commands}\n\n{replaced}" + format_table(result))
    plot(result, args.out.with_suffix(".png"))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
