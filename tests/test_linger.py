"""After the job, lte-server keeps the final state on view (and tells late workers the job is over)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lte.common.job.signals import stop_signals
from lte.server.finish import linger_seconds
from lte.worker.client import EXIT_JOB_OVER

pytestmark = pytest.mark.process  # tier: see tests/conftest.py


def test_the_default_lingers_only_on_a_terminal_with_a_dashboard():
    assert linger_seconds(-1, has_dashboard=True, interactive=True) is None  # until Ctrl+C
    assert linger_seconds(-1, has_dashboard=True, interactive=False) == 0.0  # scripts and CI end at once
    assert linger_seconds(-1, has_dashboard=False, interactive=True) == 0.0
    assert linger_seconds(5, has_dashboard=False, interactive=False) == 5.0


def _as_nohup_in_a_script() -> None:
    """The child's start as ``nohup lte-server ... &`` in a shell script leaves it: SIGHUP ignored
    (nohup) and SIGINT ignored (a background job of a shell without job control)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_stop_signals_are_int_and_term_always_and_hup_unless_started_under_nohup():
    saved = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert stop_signals() == (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup
        assert stop_signals() == (signal.SIGINT, signal.SIGTERM)
    finally:
        signal.signal(signal.SIGHUP, saved)


def test_a_lingering_server_shows_the_final_state_tells_late_workers_and_stops_on_ctrl_c(tmp_path):
    """Started as ``nohup lte-server ... &`` from a script starts it (SIGHUP and SIGINT ignored): the
    terminal's SIGHUP does not end it, Ctrl+C (SIGINT) does, from the linger, exit 0."""
    bin_dir = Path(sys.executable).parent
    # PYTHONFAULTHANDLER: a server that does not stop is sent SIGABRT below, and its threads' stacks say where it hung
    env = dict(
        {k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"
    )
    cmd = [
        str(bin_dir / "lte-server"),
        *("--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "20", "--local-workers", "1"),
        *("--port", "0", "--dashboard-port", "0", "--out", str(tmp_path / "run"), "--log-format", "json"),
        *("--linger", "120"),
    ]
    server = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_as_nohup_in_a_script
    )
    try:
        records, deadline = {}, time.monotonic() + 240
        for line in server.stderr:
            record = json.loads(line)
            records.setdefault(record["msg"].split(" ")[0], record)
            if record["msg"].startswith("job done; serving the final state") or time.monotonic() > deadline:
                break
        lingering = records["job"]
        assert "for 120 s (or until Ctrl+C)" in lingering["msg"] and lingering["linger_s"] == 120
        url, address = records["dashboard"]["url"], records["serving"]["address"]
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/status", timeout=30) as reply:
            status = json.load(reply)
        assert status["done"] is True and status["version"] == 2
        server.send_signal(signal.SIGHUP)  # the terminal closed: nohup's job goes on serving
        late = subprocess.run(
            [str(bin_dir / "lte-worker"), "--server", address, "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert late.returncode == EXIT_JOB_OVER, late.stderr  # served after the SIGHUP: told the job is over
        assert server.poll() is None
        server.send_signal(signal.SIGINT)
        try:
            rest = server.communicate(timeout=90)[1]
        except subprocess.TimeoutExpired:
            server.send_signal(signal.SIGABRT)
            stacks = server.communicate(timeout=30)[1]
            pytest.fail(
                f"lte-server still running 90 s after Ctrl+C in its linger; its stacks:\n{stacks[-6000:]}"
            )
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, rest
    assert "interrupted" not in rest  # Ctrl+C ends the linger, not a run: no checkpoint-and-130 path
