"""Logging: structlog, key=value on a console or one JSON object per line.

Configured once by the CLI (configure_logging). In an application that embeds the pipeline
and has not configured structlog, the events go through the standard ``logging`` module instead
(use_standard_logging), so the application's own logging setup decides what is shown.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Literal, TextIO, cast

import structlog

__all__ = ["configure_logging", "print_error", "use_standard_logging"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_json_errors = False  # print_error writes JSON: configure_logging was asked for format = "json"


def configure_logging(level: str = "info", fmt: Literal["console", "json"] | str = "console") -> None:
    """Send structlog output to stderr at ``level`` as ``console`` (key=value) or ``json`` lines."""
    global _json_errors
    _json_errors = fmt == "json"
    # The console renderer formats exceptions itself; JSON needs them turned into a field.
    tail: list[structlog.typing.Processor]
    if fmt == "json":
        tail = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        tail = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )


def print_error(message: str, *, prefix: str = "error: ", **fields: Any) -> None:
    """The line that says why a command stopped, on stderr: ``<prefix><message>``, or under
    ``format = "json"`` one JSON object shaped like the log's own lines (``event`` "fatal",
    ``level`` "error", ``error`` the message, then ``fields``), so that a log shipper that parses
    every line as JSON keeps the one line that matters most."""
    if _json_errors:
        record = {
            "event": "fatal",
            "level": "error",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
            "error": message,
            **fields,
        }
        line = json.dumps(record, default=str)
    else:
        line = f"{prefix}{message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def use_standard_logging() -> None:
    """Route sam3stream's events through ``logging``, each under the name of the module that logs
    it (``sam3stream.stream.source``, ...), as one line: the event, then key=value pairs. The
    application's handlers, format and levels apply; with none set up, Python shows warnings
    and errors on stderr. Pipeline does this when structlog has not been configured."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            _event_line,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _event_line(logger: object, method: str, event_dict: structlog.typing.EventDict) -> str:
    event = event_dict.pop("event", "")
    return " ".join([str(event), *(f"{key}={value}" for key, value in event_dict.items())])


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at each write, not the stream it was at configure time (a host
    that swaps it, as a test runner's capture does, would leave the logs writing to a closed file)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()
