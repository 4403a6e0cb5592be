"""``validate`` and ``run`` on configs that are valid but suspicious, or that hold unusable paths."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import structlog

import sam3stream.commands.run as run_command
from sam3stream.cli import main
from sam3stream.config import parse_config
from sam3stream.errors import ConfigError

BASE = """
[engines]
dir = "engines/x"

[prompts]
classes = ["person"]

[[cameras]]
name = "cam1"
url = "videos/a.mp4"
"""

JSONL_SINK = '[[sinks]]\ntype = "jsonl"\npath = "out"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_validate_warns_when_no_sink_takes_the_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(write(tmp_path, BASE))]) == 0  # a warning, not a problem
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok: 1 cameras, 0 sinks")
    assert len(lines) == 2 and lines[1].startswith("warning: sinks: no [[sinks]] configured")
    assert "results go nowhere" in lines[1] and "results()" in lines[1]


def test_validate_is_quiet_with_a_sink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(write(tmp_path, BASE + JSONL_SINK))]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("ok: 1 cameras, 1 sinks")


@pytest.mark.parametrize(("sinks", "warned"), [("", True), (JSONL_SINK, False)])
def test_run_logs_the_no_sinks_warning_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sinks: str, warned: bool
) -> None:
    # Only the start of `run` is under test: no logging setup, no pipeline.
    def no_loop(serve: Callable[[], Coroutine[Any, Any, int]]) -> int:
        serve().close()
        return 0

    monkeypatch.setattr(run_command, "configure_logging", lambda *args: None)
    monkeypatch.setattr(run_command, "run_loop", no_loop)
    with structlog.testing.capture_logs() as logs:
        assert main(["run", str(write(tmp_path, BASE + sinks))]) == 0
    found = [e for e in logs if e["event"] == "config_warning"]
    if not warned:
        assert found == []
        return
    [event] = found
    assert event["log_level"] == "warning" and event["key"] == "sinks"
    assert "no [[sinks]] configured" in event["detail"] and "results()" in event["detail"]


# Each path key with a NUL byte in it: the problem is reported at that key, not as a traceback.
NUL_PATHS = (
    BASE.replace('"engines/x"', '"engines/x\\u0000"').replace('"videos/a.mp4"', '"videos/a.mp4\\u0000"')
    + '[[sinks]]\ntype = "jsonl"\npath = "out\\u0000"\n[[sinks]]\ntype = "video"\ndir = "v\\u0000"\n'
)


def test_nul_byte_in_a_path_is_a_problem_at_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(NUL_PATHS, source="t.toml", base_dir=Path("/base"))
    found = dict(info.value.problems)
    assert set(found) == {"engines.dir", "cameras[0].url", "sinks[0].path", "sinks[1].dir"}
    assert all("null byte" in message for message in found.values())


def test_validate_reports_a_nul_byte_in_a_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, BASE.replace('"videos/a.mp4"', '"a.mp4\\u0000"') + JSONL_SINK)
    assert main(["validate", str(config)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{config}: cameras[0].url: ") and "null byte" in line
