"""Promises the README makes, through real processes: buffered mode, quantised snapshots and
compressed uplinks over a real server, and SIGTERM / Ctrl+C on the server and on a worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lte.server.checkpoint import latest_checkpoint, load_checkpoint
from tests.cluster import digits_job, running_server
from tests.faults import wait_for, wait_until

pytestmark = [pytest.mark.process, pytest.mark.server]  # tier: see tests/conftest.py

BIN = Path(sys.executable).parent
ENV = dict({k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}, OMP_NUM_THREADS="1")


def server_command(run_dir: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "lte-server"),
        *("--model", "mlp", "--dataset", "digits", "--lr", "1e-2", "--port", "0", "--dashboard-port", "-1"),
        *("--out", str(run_dir), *extra),
    ]


def merges(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "pushes" in r]


@pytest.mark.parametrize(
    "mode, quant, uplink",
    [("buffered", "int8", "int8-block"), ("async", "nf4", "bf16")],
)
def test_a_real_cluster_trains_in_every_mode_with_quantised_snapshots_and_compressed_uplinks(
    tmp_path, mode, quant, uplink
):
    run_dir = tmp_path / "run"
    extra = ("--buffer-size", "2") if mode == "buffered" else ()
    result = subprocess.run(
        server_command(run_dir, "--heads", "3", "--local-workers", "3", "--steps", "60", "--mode", mode)
        + ["--quant", quant, "--uplink", uplink, *extra],
        capture_output=True,
        text=True,
        timeout=400,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    records = merges(run_dir)
    assert sum(r["heads"] for r in records) == 3 * 6  # every head's 6 rounds merged, none twice
    if mode == "buffered":
        assert [r["pushes"] for r in records] == [2] * 9  # K = 2 pushes per merge, as promised
    else:
        assert [r["pushes"] for r in records] == [1] * 18  # async: each push merged on arrival
    assert summary["test_accuracy"] >= 0.5, summary  # digits: chance is 0.1; it learned through q(W)
    config = (run_dir / "config.toml").read_text()
    assert f'quant = "{quant}"' in config and f'uplink = "{uplink}"' in config


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl+C"])
def test_a_stopped_server_writes_a_checkpoint_says_how_to_resume_and_stops_its_workers(tmp_path, sig):
    run_dir = tmp_path / "run"
    cmd = server_command(
        run_dir, "--heads", "2", "--local-workers", "1", "--steps", "100000", "--checkpoint-every", "0"
    )
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and merges(run_dir), 240, "a first merge")
        server.send_signal(sig)
        err = server.communicate(timeout=120)[1]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 130, err
    assert f"--resume {run_dir}" in err and f"--config {run_dir}/config.toml" in err
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None  # --checkpoint-every 0: this one was written by the signal alone
    state, _ = load_checkpoint(checkpoint)
    assert state["version"] >= 1 and not state["done"]
    log = (run_dir / "worker-0.log").read_text()
    assert "Traceback" not in log  # the local worker was stopped, not left to crash


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl+C"])
def test_a_stopped_worker_leaves_the_job_and_its_heads_return_at_once(sig):
    job = digits_job(heads=2, steps=100000)
    with running_server(job, lease_timeout_s=600) as srv:  # only a Leave frees the heads in time
        c = srv.coordinator
        worker = subprocess.Popen(
            [str(BIN / "lte-worker"), "--server", srv.address, "--threads", "1", "--quiet"],
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        try:
            wait_for(c, lambda c: c.version >= 1, 240, "the worker's first merge")
            worker.send_signal(sig)
            err = worker.communicate(timeout=60)[1]
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert worker.returncode == 130, err
        assert "lte-worker: interrupted; left the job" in err
        started = time.monotonic()
        wait_until(lambda: all(h.lease_id is None for h in c.heads.values()), 10, "the heads to return")
        assert time.monotonic() - started < 10  # a Leave, not a 600 s lease expiry
        assert [lease.state for lease in c.leases.values()] == ["left"]
