"""After the job: keep the dashboard (and the gRPC server, which tells late workers the job is over)
serving the final state for a while, so that someone can still look at it."""

from __future__ import annotations

import faulthandler
import logging
import sys
import threading

_log = logging.getLogger("lte.server")

EXIT_BOUND_S = 45.0  # a server stopped during its linger that is still running after this: stacks, exit 1


def linger_seconds(setting: float, *, has_dashboard: bool, interactive: bool | None = None) -> float | None:
    """Seconds to keep serving after the job: ``setting`` when >= 0; for -1 (the default), until
    Ctrl+C (None) on a terminal with a dashboard, else 0. ``interactive``: stdin is a terminal.
    """
    if setting >= 0:
        return float(setting)
    if interactive is None:
        interactive = sys.stdin is not None and sys.stdin.isatty()
    return None if has_dashboard and interactive else 0.0


def linger(seconds: float | None, url: str | None, stop: threading.Event | None = None) -> None:
    """Wait ``seconds`` (None: until Ctrl+C or SIGTERM), saying so once. Returns normally on Ctrl+C."""
    if seconds == 0:
        if url:  # off a terminal (or --linger 0) the page goes now: say so, and how to keep it
            _log.info(
                "job done; the dashboard at %s closes now (--linger SECONDS keeps it serving)",
                url,
                extra={"linger_s": 0},
            )
        return
    where = f"at {url}" if url else "on the gRPC port"
    until = "until Ctrl+C" if seconds is None else f"for {seconds:g} s (or until Ctrl+C)"
    _log.info("job done; serving the final state %s %s", where, until, extra={"linger_s": seconds})
    stop = stop or threading.Event()
    try:
        stop.wait(seconds)
    except KeyboardInterrupt:  # Ctrl+C (and SIGTERM) end the linger, not the run
        # what is left (the dashboard's and gRPC's bounded stops, the interpreter's exit) takes
        # seconds; should it hang (gRPC's C core at exit), the threads' stacks go to stderr and the
        # process ends (exit 1) rather than never, as a stopping lte-worker does
        faulthandler.dump_traceback_later(EXIT_BOUND_S, exit=True)
