"""``sam3stream validate CONFIG``: check a config file and list every problem with its key path.

Exits 1 if there are problems. Warnings (valid but probably unintended settings) are printed
after the ``ok`` line and do not change the exit code; ``run`` logs the same ones at start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sam3stream.config import Config, load_config
from sam3stream.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("validate", help="check a config file without running it")
    p.add_argument("config", type=Path, help="TOML config file")
    p.set_defaults(func=run)


def config_warnings(config: Config) -> list[tuple[str, str]]:
    """(key path, message) for each setting that is valid but probably not what was meant."""
    warnings: list[tuple[str, str]] = []
    if not config.sinks:
        # Allowed (an embedding application may only read Pipeline.results()), but from the CLI
        # it runs the model and throws every result away.
        warnings.append(
            (
                "sinks",
                "no [[sinks]] configured: results go nowhere, except to an application embedding "
                "Pipeline that reads results()",
            )
        )
    return warnings


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for path, message in exc.problems:
            print(f"{path}: {message}" if path else message)
        return 1
    print(f"ok: {config.summary()}")
    for path, message in config_warnings(config):
        print(f"warning: {path}: {message}")
    return 0
