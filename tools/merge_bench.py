"""Merge several `sam3stream bench` JSON results (e.g. one per GPU session) into one report.

A later file's row replaces an earlier file's row for the same resolution and camera count
(e.g. one-camera rows measured on a backend sized for one camera, over the one-camera rows of
an 8-camera run); the report lists what was replaced. Rows measured on different devices or
torch builds are not merged unless --mixed says so: a table must not hide a mix.

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


class MergeError(Exception):
    """An input that cannot be merged: named, with why."""


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("ours"), list):
        raise MergeError(f"{path}: not a `sam3stream bench` result (no 'ours' rows)")
    return data


def _where(row: dict[str, Any]) -> str | None:
    """The device and torch build a row names (older results name neither)."""
    if "device" not in row:
        return None
    return f"{row['device']} (torch {row.get('torch', '?')})"


def merge(paths: list[Path], *, mixed: bool = False) -> dict[str, Any]:
    parts = [(str(p), _read(p)) for p in paths]
    where: dict[str, set[str]] = {}
    for source, part in parts:
        for row in [*part["ours"], *part.get("peer", [])]:
            if (named := _where(row)) is not None:
                where.setdefault(named, set()).add(source)
    if len(where) > 1 and not mixed:
        listed = "; ".join(f"{w}: {', '.join(sorted(files))}" for w, files in sorted(where.items()))
        raise MergeError(
            f"the inputs were measured on different devices or builds ({listed}); --mixed merges them"
        )
    replaced: list[str] = []
    return {
        "merged_from": [source for source, _ in parts],
        "commands": [part.get("command", "") for _, part in parts],
        "ours": _latest([(source, r) for source, part in parts for r in part["ours"]], replaced),
        "peer": _latest([(source, r) for source, part in parts for r in part.get("peer", [])], replaced),
        "replaced": replaced,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True, help="output stem (.json/.md/.png)")
    parser.add_argument("--mixed", action="store_true", help="merge rows of different devices or builds")
    args = parser.parse_args()
    try:
        result = merge(args.inputs, mixed=args.mixed)
    except MergeError as exc:
        parser.error(str(exc))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    commands = "\n".join(
        f"- `{c}` ({p})" for c, p in zip(result["commands"], result["merged_from"], strict=True)
    )
    replaced = "".join(f"- {line}\n" for line in result["replaced"])
    replaced = f"Rows replaced by a later file:\n{replaced}\n" if replaced else ""
    args.out.with_suffix(".md").write_text(f"Merged from:\n{commands}\n\n{replaced}" + format_table(result))
    plot(result, args.out.with_suffix(".png"))
    print(replaced + format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
