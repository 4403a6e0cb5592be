"""``sam3stream`` command line: one subcommand per module in sam3stream.commands.

Errors a user can cause (:class:`Sam3StreamError`, and an ``OSError`` on a path they gave)
print one line per problem on stderr, no traceback, and exit 2 for configuration errors, 1 for
the others.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from sam3stream import __version__
from sam3stream.errors import ConfigError, Sam3StreamError

__all__ = ["COMMANDS", "build_parser", "main"]

# One module per subcommand: (module, command name).
COMMANDS: tuple[tuple[str, str], ...] = (
    ("sam3stream.commands.run", "run"),
    ("sam3stream.commands.validate", "validate"),
    ("sam3stream.commands.export", "export"),
    ("sam3stream.commands.build", "build"),
    ("sam3stream.commands.infer", "infer"),
    ("sam3stream.commands.checkpoint", "checkpoint"),
    ("sam3stream.commands.bench", "bench"),
    ("sam3stream.commands.plan", "plan"),
    ("sam3stream.commands.demo", "demo"),
)


# Commands that set up logging themselves (the service's level and format).
_OWN_LOGGING = ("run", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3stream", description="Run SAM 3 on many video streams and publish per-frame detections."
    )
    parser.add_argument("--version", action="version", version=f"sam3stream {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name, _name in COMMANDS:
        # Each command module imports its heavy dependencies inside its handler, so building the
        # parser stays cheap and `sam3stream infer` never pulls in torch.
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from sam3stream.log import configure_logging, print_error

    args = build_parser().parse_args(argv)
    if args.command not in _OWN_LOGGING:
        # One-shot commands print their own progress and results; logs go to stderr, and only
        # warnings.
        configure_logging("warning")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        problems = [{"key": key, "problem": problem} for key, problem in exc.problems]
        print_error(str(exc), prefix="", problems=problems, source=exc.source)
        return 2
    except Sam3StreamError as exc:
        print_error(str(exc))
        return 1
    except OSError as exc:
        # A path the user gave that cannot be written or read (permission, not a folder, disk
        # full): the message names the file; a traceback would not help.
        print_error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    return code
