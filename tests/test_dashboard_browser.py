"""The dashboard in a real browser: Playwright drives Debian's chromium against a real local cluster.

Skipped only where playwright or /usr/bin/chromium is missing and CI is unset; under CI (which
installs both) a missing browser fails the run instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lte.server.dashboard import DashboardServer

pytestmark = [pytest.mark.process, pytest.mark.server]  # tier: see tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "artifacts" / "dashboard.png"
README_SCREENSHOT = REPO / "docs" / "dashboard.png"  # refreshed only with LTE_UPDATE_SCREENSHOT=1
START_TIMEOUT_S = 180  # a cold CI machine imports torch in three processes before anything shows
PAGE_TIMEOUT_S = 240
DASHBOARD_LINE = re.compile(r"lte-server: dashboard at (http://\S+)")


def _why_no_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; no browser download is needed)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _why_no_browser()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def page_of(browser, url: str):
    """(page, errors): a fresh page at ``url`` and the console errors and uncaught exceptions it logs."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(url)
        yield page, errors
    finally:
        context.close()


def at_least(selector: str, attribute: str, n: int) -> str:
    """A CSS selector that matches ``selector`` once its integer ``attribute`` is >= n.

    Playwright waits on CSS without evaluating strings in the page, which the dashboard's
    Content-Security-Policy (no 'unsafe-eval') would refuse.
    """
    return selector + "".join(f':not([{attribute}="{i}"])' for i in range(n))


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc): the server's local workers."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait for processes that are not our children to end (pidfd: no polling); kill leftovers by pid."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            continue  # already gone
        try:
            if not select.select([fd], [], [], timeout_s)[0]:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(fd)


@contextlib.contextmanager
def lte_server(out_dir: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """``lte-server`` with two local workers as a subprocess; yields (process, dashboard URL).

    On exit the server is terminated by pid (it stops its workers); any worker still alive after
    that is killed by pid.
    """
    cmd = [
        sys.executable,
        "-m",
        "lte.server.cli",
        "--model", "mlp",
        "--dataset", "digits",
        "--heads", "4",
        "--steps", "400",
        "--merge-every", "10",
        "--local-workers", "2",
        "--port", "0",
        "--dashboard-port", "0",
        "--eval-every", "2",
        "--out", str(out_dir),
        *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=out_dir)
    found: dict[str, str] = {}
    seen = threading.Event()
    log = out_dir / "server.log"

    def drain() -> None:  # read stderr to the end, so the server never blocks on a full pipe
        with open(log, "wb") as sink:
            for line in proc.stderr:
                sink.write(line)
                sink.flush()
                match = DASHBOARD_LINE.search(line.decode(errors="replace"))
                if match and not seen.is_set():
                    found["url"] = match.group(1)
                    seen.set()
        seen.set()  # the server ended: wake the waiter either way

    reader = threading.Thread(target=drain, name="lte-server-stderr", daemon=True)
    reader.start()
    workers: list[int] = []
    try:
        assert seen.wait(START_TIMEOUT_S), f"no dashboard line within {START_TIMEOUT_S} s; see {log}"
        assert "url" in found, (
            f"lte-server exited with {proc.poll()} before its dashboard started:\n{log.read_text()}"
        )
        yield proc, found["url"]
        workers = _children(proc.pid)
    finally:
        workers = workers or _children(proc.pid)
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _wait_gone(workers, timeout_s=15)
        reader.join(timeout=10)


@pytest.mark.timeout(420)
def test_page_shows_workers_and_curves_of_a_live_local_cluster(browser, tmp_path):
    with lte_server(tmp_path) as (proc, url):
        assert url.startswith("http://127.0.0.1:"), url
        with page_of(browser, url) as (page, errors):
            timeout_ms = PAGE_TIMEOUT_S * 1000
            page.wait_for_selector("#workers tbody tr:nth-child(2)", timeout=timeout_ms)
            page.wait_for_selector(
                at_least("#chart-loss-version", "data-points", 2), state="attached", timeout=timeout_ms
            )
            evals = 4 if os.environ.get("LTE_UPDATE_SCREENSHOT") else 1  # the README's picture waits for more
            page.wait_for_selector(
                at_least("#chart-accuracy-version", "data-points", evals),
                state="attached",
                timeout=timeout_ms,
            )
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            if os.environ.get("LTE_UPDATE_SCREENSHOT"):
                README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                README_SCREENSHOT.write_bytes(SCREENSHOT.read_bytes())

            rows = page.locator("#workers tbody tr")
            assert rows.count() == 2
            ids = {rows.nth(i).get_attribute("data-worker-id") for i in range(2)}
            assert all(i and i.startswith("w") for i in ids), ids
            for chart in ("loss-version", "loss-samples", "bytes-time"):
                assert int(page.get_attribute(f"#chart-{chart}", "data-points")) >= 2, chart
                assert page.locator(f"#chart-{chart} svg path.line").count() >= 1, chart
            assert int(page.get_attribute("#chart-accuracy-samples", "data-points")) >= 1
            assert page.inner_text("#stat-version") not in ("", "–", "0")
            assert "snapshots built" in page.inner_text("#server-counters")  # every pull needs one
            assert "mlp on digits" in page.inner_text("#job-title")
            assert page.locator("#job dt", has_text="merge_every").count() == 1
            assert page.locator("#server-settings dt", has_text="lease_timeout").count() == 1
            assert errors == [], errors  # CSP violations and script errors show up here
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_status() -> dict:
    history = [
        dict(
            version=v,
            time=0.5 * v,
            samples=64 * v,
            train_loss=2.0 / v,
            pushes=2,
            heads=2,
            bytes_up=1000 * v,
            bytes_down=4000 * v,
        )
        for v in range(1, 6)
    ]
    evals = [
        dict(version=v, samples=64 * v, time=0.5 * v, test_loss=1.0 / v, test_accuracy=0.5 + 0.05 * v)
        for v in (2, 4)
    ]
    worker = dict(
        worker_id="w1-abcdef", name="box-1", device="cpu", heads=[0, 1], last_seen_s=0.3, staleness=0, samples_per_s=100.0,
        samples=320, pushes=5, bytes_up=5000, bytes_down=20000, state="training", train_loss=0.4,
    )  # fmt: skip
    return dict(
        job=dict(model="mlp", dataset="digits", heads=2, rank=4, merge_every=10, mode="sync"),
        version=5, done=False, samples=320, bytes_up=5000, bytes_down=20000, head_rounds_applied=10,
        target_head_rounds=40, elapsed_s=2.6, workers=[worker], free_heads=[], history=history, evals=evals,
    )  # fmt: skip


@pytest.mark.timeout(120)
def test_page_opened_with_a_token_passes_it_to_every_fetch(browser):
    with DashboardServer(_fake_status, token="s3cret-tok") as dashboard:
        with page_of(browser, dashboard.url + "?token=s3cret-tok") as (page, errors):
            page.wait_for_selector("#workers tbody tr", timeout=60_000)
            page.wait_for_selector(
                at_least("#chart-loss-version", "data-points", 5), state="attached", timeout=60_000
            )
            assert page.get_attribute("#connection", "data-state") == "live"
            assert errors == [], errors
        with page_of(browser, dashboard.url) as (page, _):  # no token: not even the page
            assert page.locator("#workers").count() == 0
            assert "a valid token is required" in page.content()
