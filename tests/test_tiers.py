"""The test tiers' check (tests/conftest.py), run in a child pytest: in the fast tier a test that
starts a process or a server without its marker fails, however it hides the start."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # tier: see tests/conftest.py (it runs a child pytest)

CONFTEST = (Path(__file__).parent / "conftest.py").read_text().split("pytest_plugins")[0]
INI = """
[pytest]
markers =
    process: starts a process
    server: starts a server
    slow: slow
"""
TESTS = """
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest


def child():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_unmarked_process():
    child()


def test_unmarked_process_swallowed():
    try:
        child()
    except Exception:
        pass


def test_unmarked_process_from_a_thread():
    def run():
        try:
            child()
        except BaseException:
            pass

    t = threading.Thread(target=run)
    t.start()
    t.join()


def test_unmarked_server():
    grpc.server(ThreadPoolExecutor(1)).stop(None)


@pytest.mark.process
def test_marked_process():
    child()


@pytest.mark.server
def test_marked_server():
    grpc.server(ThreadPoolExecutor(1)).stop(None)


def test_plain():
    assert sum(range(4)) == 6
"""


def test_in_the_fast_tier_an_unmarked_process_or_server_fails_the_test(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(TESTS)
    monkeypatch.setenv("LTE_TIER_CHECK", "1")  # checks with every test selected
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-m", "not slow")
    result.assert_outcomes(passed=3, failed=4)
    result.stdout.fnmatch_lines(
        [
            "*test_unmarked_process* starts a process (*) without the 'process' marker*",
            "*test_unmarked_server* starts a gRPC server (grpc.server) without the 'server' marker*",
        ]
    )
    monkeypatch.delenv("LTE_TIER_CHECK")  # the fast tier's -m turns the check on by itself
    deselected = pytester.runpytest_subprocess(
        "-q", "-p", "no:cacheprovider", "-m", "not process and not server"
    )
    deselected.assert_outcomes(passed=1, failed=4, deselected=2)


def test_outside_the_fast_tier_nothing_is_checked(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(TESTS)
    monkeypatch.delenv("LTE_TIER_CHECK", raising=False)
    pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider").assert_outcomes(passed=7)
