"""print_error: the line that says why a command stopped, plain or as a JSON log event."""

from __future__ import annotations

import json

import pytest

from sam3stream.log import configure_logging, print_error


def test_plain_text_unless_the_logs_are_json(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "console")
    print_error("engine gone", camera="a")
    assert capsys.readouterr().err == "error: engine gone\n"
    configure_logging("info", "json")
    try:
        print_error(
            "two problems\nsecond", prefix="", problems=[{"key": "engines.dir", "problem": "missing"}]
        )
    finally:
        configure_logging("warning", "console")
    (line,) = capsys.readouterr().err.splitlines()  # one line even for a multi-line message
    record = json.loads(line)
    assert record["event"] == "fatal" and record["level"] == "error"
    assert record["error"] == "two problems\nsecond"
    assert record["problems"] == [{"key": "engines.dir", "problem": "missing"}]
    assert record["timestamp"].endswith("Z")
