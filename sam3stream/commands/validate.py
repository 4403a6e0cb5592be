"""``sam3stream validate CONFIG``: check a config file and list every problem with its key path.

Problems go to stderr, one line each, and exit 2, as ``run`` reports them. Warnings (valid but
probably unintended settings) are printed after the ``ok`` line and do not change the exit
code; ``run`` logs the same ones at start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sam3stream.config import Config, load_config


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
    # A ConfigError reaches the CLI, which prints it as it does for `run`: the same lines on
    # stderr and the same exit code, so a script can check a config either way.
    config = load_config(args.config)
    print(f"ok: {config.summary()}")
    for path, message in config_warnings(config):
        print(f"warning: {path}: {message}")
    return 0
