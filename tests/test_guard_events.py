"""The suite counts the update guard's false positives in the processes its tests start too
(tests/conftest.py, ``LTE_GUARD_EVENTS``): a guard that fires in an ``lte-server`` subprocess of an
honest test fails it, as one in the pytest process does; a ``rogue`` test may make it fire."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from lte.server.guard import EVENTS_ENV
from tests.cluster import worker_processes
from tests.conftest import other_processes_guard_events
from tests.faults import server_with_stderr, wait_until

pytestmark = pytest.mark.process  # child pytest runs and lte-server processes

BIN = Path(sys.executable).parent
CONFTEST = "\n".join(  # the suite's conftest, less its pytester plugin line
    line
    for line in (Path(__file__).parent / "conftest.py").read_text().splitlines()
    if not line.startswith("pytest_plugins")
)
FIRE = (
    "from lte.common.job.config import JobConfig\n"
    "from lte.server.guard import GuardSettings, UpdateGuard\n"
    "UpdateGuard(GuardSettings(), JobConfig()).note_quarantine('w1-abc', 'rogue', [0], 'a test', 3)\n"
)
TESTS = f"""
import subprocess, sys
import pytest

FIRE = {FIRE!r}

def test_honest_but_the_guard_of_a_process_it_started_fired():
    subprocess.run([sys.executable, "-c", FIRE], check=True, capture_output=True)

@pytest.mark.rogue
def test_rogue_on_purpose():
    subprocess.run([sys.executable, "-c", FIRE], check=True, capture_output=True)

def test_honest_and_quiet():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def test_a_guard_that_fires_in_a_process_an_honest_test_started_fails_that_test(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    rogue: poisons pushes on purpose\n")
    pytester.makepyfile(TESTS)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)  # the honest one fails at teardown, where the check runs
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_honest_but_the_guard_of_a_process_it_started_fired*",
            "*the update guard of another process (an lte-server the test started) fired 1 time(s)*",
        ]
    )


@pytest.mark.server
@pytest.mark.rogue  # it makes the guard fire on purpose
@pytest.mark.timeout(900)
def test_the_events_of_an_lte_server_subprocess_reach_the_suites_count(tmp_path):
    """A real lte-server and a worker whose pushes are x300: the server's guard refuses the first
    one, and the event is in the session's file with the server's pid (what the autouse check of an
    honest test reads)."""
    path = os.environ[EVENTS_ENV]
    offset = os.path.getsize(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server, lines, reader = server_with_stderr(
        [str(BIN / "lte-server"), "--dataset", "digits", "--heads", "1", "--rank", "4", "--steps", "40",
         "--merge-every", "2", "--batch-size", "8", "--port", "0", "--dashboard-port", "-1",
         "--out", str(tmp_path / "run"), "--linger", "0"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    try:
        hint = wait_until(
            lambda: (
                next((ln for ln in lines if "start workers with: " in ln), None) or server.poll() is not None
            ),
            300,
            "the server's address",
        )
        assert server.poll() is None, "".join(lines)
        address = shlex.split(hint.split("start workers with: ", 1)[1])[2]
        with worker_processes(address, [["--poison-push", "scale=300"]], tmp_path):
            events = wait_until(
                lambda: other_processes_guard_events(path, offset), 600, "the server's guard event"
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
    reader.join(timeout=30)
    assert {e["pid"] for e in events} == {server.pid}, events
    assert events[0]["action"] == "refused" and "> bound" in events[0]["what"], events
