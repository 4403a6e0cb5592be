"""``sam3stream validate CONFIG``: check a config file and list every problem with its key path."""

from __future__ import annotations

import argparse
from pathlib import Path

from sam3stream.config import load_config
from sam3stream.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("validate", help="check a config file without running it")
    p.add_argument("config", type=Path, help="TOML config file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for path, message in exc.problems:
            print(f"{path}: {message}" if path else message)
        return 1
    print(f"ok: {config.summary()}")
    return 0
