"""Suite-wide policy.

Skips: under ``LTE_NO_SKIPS=1`` (set by ``make test`` and CI) a skipped test fails. A skip there
means a missing dependency (a browser, a dataset, a validator) hid a test that the README's
command promises to run; the failure names what was missing.

Tiers: a test that starts a process carries the ``process`` marker, one that starts a gRPC or
HTTP server in this process the ``server`` marker (pyproject.toml registers both; a whole file
says ``pytestmark = pytest.mark.process``). ``make test-fast`` runs ``-m "not process and not
server and not slow"``. In that tier the markers are checked, not trusted: while a test without
them sets up, runs or tears down, starting a process (``subprocess``, ``multiprocessing``,
``os.fork``, ``posix_spawn``) or a server (``grpc.server``, ``uvicorn.Server``) fails the test,
naming the marker it needs. (Any run whose ``-m`` names ``process`` or ``server`` checks so, or
any run under ``LTE_TIER_CHECK=1``; ``make test`` runs everything and does not.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading

import pytest

NO_SKIPS = os.environ.get("LTE_NO_SKIPS") == "1"


def _fail_skip(report) -> None:
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under LTE_NO_SKIPS=1 (a dependency the suite needs is missing): {reason}"


# what a test without the marker may not start: (module, attribute, marker, what it starts)
_GUARDED = (
    ("subprocess", "_fork_exec", "process", "a process"),  # Python >= 3.11's subprocess
    ("_posixsubprocess", "fork_exec", "process", "a process"),  # 3.10's subprocess, multiprocessing spawn
    ("os", "fork", "process", "a process"),  # multiprocessing fork, os.fork
    ("os", "forkpty", "process", "a process"),
    ("os", "posix_spawn", "process", "a process"),
    ("os", "posix_spawnp", "process", "a process"),
    ("grpc", "server", "server", "a gRPC server"),
    ("uvicorn.server", "Server.startup", "server", "an HTTP server"),
)
_violations: pytest.StashKey[list[str]] = pytest.StashKey()
_guard_events_key: pytest.StashKey[tuple] = pytest.StashKey()
GUARD_EVENTS_ENV = "LTE_GUARD_EVENTS"  # lte.server.guard.EVENTS_ENV (imported late: torch)
_guard_lock = threading.Lock()
_check_tiers = False


# The file every guard of the session's processes appends its events to (``LTE_GUARD_EVENTS``,
# server/guard.py), set in this process's environment before collection, so that the ``lte-server``
# processes that tests start with ``os.environ`` (or a copy of it) report there too; and the value
# it replaced (a child pytest run in this process restores its parent's).
_guard_events: dict[str, str | None] = {}


def pytest_configure(config):
    global _check_tiers
    expression = config.getoption("markexpr", "") or ""
    _check_tiers = os.environ.get("LTE_TIER_CHECK") == "1" or any(
        marker in expression for marker in ("process", "server")
    )
    fd, path = tempfile.mkstemp(prefix="lte-guard-events-", suffix=".jsonl")
    os.close(fd)
    config.stash[_guard_events_key] = (path, os.environ.get(GUARD_EVENTS_ENV), dict(_guard_events))
    _guard_events["path"] = path
    os.environ[GUARD_EVENTS_ENV] = path


def pytest_unconfigure(config):
    path, before, outer = config.stash.get(_guard_events_key, (None, None, {}))
    if path is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
    if before is None:
        os.environ.pop(GUARD_EVENTS_ENV, None)
    else:
        os.environ[GUARD_EVENTS_ENV] = before
    _guard_events.clear()
    _guard_events.update(outer)


@contextlib.contextmanager
def _tier_guard(item):
    """Make starting a process or a server fail ``item`` unless it carries the marker for it."""
    import importlib

    if not _check_tiers:
        yield
        return
    allowed = {m.name for m in item.iter_markers()} & {"process", "server"}
    violations = item.stash.setdefault(_violations, [])
    restore = []
    for module_name, attribute, marker, what in _GUARDED:
        if marker in allowed:
            continue
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name, None)
        if original is None:
            continue

        def refuse(*args, _what=what, _marker=marker, _name=f"{module_name}.{attribute}", **kwargs):
            message = (
                f"{item.nodeid} starts {_what} ({_name}) without the '{_marker}' marker: "
                f"mark it @pytest.mark.{_marker} (make test-fast runs only unmarked tests)"
            )
            with _guard_lock:
                violations.append(message)
            pytest.fail(message, pytrace=False)  # a BaseException: `except Exception` cannot hide it

        setattr(owner, name, refuse)
        restore.append((owner, name, original))
    try:
        yield
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _tier_guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _tier_guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _tier_guard(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    violations = item.stash.get(_violations, [])
    if violations:
        if not report.failed:  # started from a thread, or the refusal was swallowed: still a failure
            report.outcome = "failed"
            report.longrepr = violations[0]
        violations.clear()
    _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())


pytest_plugins = ["pytester"]  # tests/test_skip_policy.py runs this very policy in a child pytest


@pytest.fixture(autouse=True)
def _lte_log_handlers():
    """A test that runs a command's ``main()`` in process points the ``lte`` logger at that test's
    captured stderr (``setup_logging``); once pytest closes that stream, every later test's log
    record printed "--- Logging error ---" with a traceback into its own stderr. Restore the handlers."""
    logger = logging.getLogger("lte")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def other_processes_guard_events(path, offset: int) -> list[dict]:
    """The guard events that processes other than this one appended to ``path`` after ``offset``."""
    import json

    with open(path, "rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            event = {"pid": None, "what": line}  # a torn line still counts
        if event.get("pid") != os.getpid():
            events.append(event)
    return events


@pytest.fixture(autouse=True)
def _update_guard_false_positives(request):
    """Every honest job of the suite: the update guard never refuses, clips or rolls back (issue 24).
    It counts in this process (tests/test_guard.py runs every zoo model through the server's merge
    path) and in every process a test starts that inherits ``LTE_GUARD_EVENTS`` (``lte-server``
    subprocesses: their events are appended to the session's file, ``_guard_events``); a test that poisons pushes
    on purpose is marked ``rogue``. A process started with an environment built from scratch is not
    counted."""
    from lte.server.guard import guard_fired_total

    path = _guard_events["path"]
    before = guard_fired_total()
    offset = os.path.getsize(path)
    yield
    fired = guard_fired_total() - before
    elsewhere = other_processes_guard_events(path, offset)
    if request.node.get_closest_marker("rogue") is None:
        assert fired == 0, f"the update guard fired {fired} time(s) in an honest test: a false positive"
        assert not elsewhere, (
            f"the update guard of another process (an lte-server the test started) fired {len(elsewhere)} "
            f"time(s) in an honest test, a false positive: {elsewhere[0]}"
        )
