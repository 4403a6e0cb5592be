"""CLI subcommands, one module each.

Each module defines ``register(subparsers) -> None``, which adds its parser and
sets ``func`` (``func(args) -> int``, the exit code). Keep heavy imports inside
``func``: every module is imported to build ``--help``.
"""
