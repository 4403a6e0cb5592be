"""A real Mosquitto broker for tests: 127.0.0.1, a free port, anonymous, no persistence.

Use the ``mosquitto`` fixture (import it into a conftest); it skips the test when
no ``mosquitto`` binary is installed, or fails it when ``MQTT_REQUIRED`` is set
(CI, where a silently skipped broker test would hide a broken setup). The broker can be stopped and started
again on the same port to simulate outages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["Mosquitto", "find_mosquitto", "free_port", "mosquitto"]


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    def __init__(self, binary: str, workdir: Path, port: int | None = None, listener: str = "") -> None:
        """``listener``: more config lines for the one listener (TLS: ``cafile``, ``certfile``...)."""
        self.binary = binary
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # Running as root, mosquitto would switch to its own user; stay as we are.
            "user root\n"
            # Listener options (cafile, certfile...) apply to the listener above them.
            f"{listener}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 5.0) -> None:
        if self.running:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started broker, stopped after the test."""
    binary = find_mosquitto()
    if binary is None:
        if os.environ.get("MQTT_REQUIRED"):
            pytest.fail("MQTT_REQUIRED is set but no mosquitto binary was found")
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(binary, tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
