"""The suite's skip policy (tests/conftest.py), run in a child pytest: under LTE_NO_SKIPS=1 a skip fails."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.process  # tier: see tests/conftest.py (runs a child pytest)

CONFTEST = (Path(__file__).parent / "conftest.py").read_text().split("pytest_plugins")[0]
TESTS = """
import pytest

def test_needs_a_browser():
    pytest.skip("/usr/bin/chromium is missing")

@pytest.fixture
def dataset():
    pytest.skip("apt-get install dataset-fashion-mnist")

def test_needs_a_dataset(dataset):
    pass

def test_plain():
    pass
"""


def test_a_skip_fails_under_lte_no_skips_and_names_what_is_missing(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    monkeypatch.setenv("LTE_NO_SKIPS", "1")
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1, failed=1, errors=1)  # the fixture's skip fails at setup
    result.stdout.fnmatch_lines(["*skipped under LTE_NO_SKIPS=1*chromium is missing*"])


def test_without_lte_no_skips_a_skip_stays_a_skip(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(TESTS)
    monkeypatch.delenv("LTE_NO_SKIPS", raising=False)
    pytester.runpytest_subprocess("-q").assert_outcomes(passed=1, skipped=2)
