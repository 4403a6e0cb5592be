"""``sam3stream run CONFIG``: run the pipeline until the files end or a signal stops it.

SIGINT/SIGTERM/SIGHUP drain (sources stop, accepted frames get their results, sinks
flush) within ``lifecycle.drain_timeout_s`` and exit 0; a second signal exits 1
at once. A fatal error (the engine dying) exits 1 with a one-line message, and so
does a run in which every camera failed (each camera's error on its own line).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from sam3stream.commands.validate import config_warnings
from sam3stream.config import Config, load_config
from sam3stream.log import configure_logging, print_error

log = structlog.get_logger(__name__)

# After a second signal: how long cancellation may take before the process just exits.
HARD_EXIT_S = 3.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("run", help="run the cameras -> model -> sinks pipeline of a config file")
    p.add_argument("config", type=Path, help="TOML config file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    configure_logging(config.logging.level, config.logging.format)
    for key, message in config_warnings(config):
        log.warning("config_warning", key=key, detail=message)
    return run_loop(lambda: serve(config))


def run_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main`` on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


async def serve(config: Config) -> int:
    from sam3stream.stream.pipeline import Pipeline

    loop = asyncio.get_running_loop()
    pipeline = Pipeline(config, results_queue=0)  # results go to the configured sinks only
    task = asyncio.current_task()
    assert task is not None
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if not pipeline.running:
            # The engine is still being exported or loaded, neither of which can be interrupted,
            # and nothing has run yet: leave at once (an export writes to a .partial folder that
            # only becomes the engine directory when complete).
            log.warning("signal_received", signal=sig.name, action="exiting while the engine loads")
            _exit_now(sig, None)
        if signals_seen == 1:
            log.info("signal_received", signal=sig.name, action="draining")
            pipeline.request_stop()
            return
        log.warning("signal_received", signal=sig.name, action="exiting now")
        # Cancellation still has to wait for a decode read or an engine call to return;
        # past HARD_EXIT_S the process exits regardless.
        timer = threading.Timer(HARD_EXIT_S, os._exit, (1,))
        timer.daemon = True
        timer.start()
        task.cancel()

    # SIGHUP too: a closed terminal or a reload would otherwise kill the process undrained.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await pipeline.start()
        await pipeline.wait()
    except asyncio.CancelledError:
        await pipeline.abort()
        print_error("stopped by a second signal without draining")
        return 1
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
            if signals_seen:
                # The process may still wait for a thread that cannot be interrupted (a stuck
                # engine call is joined at exit): a further signal ends it at once.
                signal.signal(sig, _exit_now)
    errors = pipeline.camera_errors()
    if errors and len(errors) == len(config.cameras):
        for name, error in errors.items():
            print_error(f"camera {name}: {error}", camera=name)
        return 1
    return 0


def _exit_now(signum: int, frame: object) -> None:
    print_error("stopped by a signal before the pipeline could drain")
    os._exit(1)
