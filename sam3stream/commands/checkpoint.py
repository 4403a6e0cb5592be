"""`sam3stream checkpoint random SIZE --out DIR`: a random checkpoint in the facebook/sam3 layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("checkpoint", help="write checkpoints")
    sub = p.add_subparsers(dest="checkpoint_command", required=True)
    r = sub.add_parser("random", help="write a seeded random checkpoint (config, safetensors, tokenizer)")
    r.add_argument("size", choices=["tiny", "full"])
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sam3stream.model.checkpoint import write_random_checkpoint

    path = write_random_checkpoint(args.size, args.out, seed=args.seed)
    print(f"random {args.size} checkpoint written to {path}")
    return 0
