"""The stop signals lte-server and lte-worker obey, by one rule.

A stop signal makes either command stop as Ctrl+C does (the server: a checkpoint and the resume
line, exit 130; a worker: it leaves its lease, exit 130). Which signals count depends on what the
process was started with, as POSIX tools do (nohup(1), and sh(1)'s background jobs):

- ``SIGINT`` (Ctrl+C) and ``SIGTERM`` always: a script's ``lte-server ... &`` starts with SIGINT
  ignored (a shell without job control does that to its background jobs), and ``kill -INT PID``
  must still stop it cleanly rather than do nothing;
- ``SIGHUP`` (the terminal closed) unless the process started with it ignored: that is what
  ``nohup lte-server ...`` asks for, a job that outlives its terminal (README, "Stopping and
  resuming"). Local workers inherit the server's choice.
"""

from __future__ import annotations

import signal


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals to handle as a stop, now: SIGINT, SIGTERM, and SIGHUP unless it is ignored
    (``signal.getsignal``; call it before installing handlers). Main thread or not, no side effects."""
    found = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        found.append(signal.SIGHUP)
    return tuple(found)
