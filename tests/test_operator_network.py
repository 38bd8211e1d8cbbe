"""What a real lte-worker process tells its user when the server refuses it: one line and an exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lte.common.wire.auth import TOKEN_ENV
from lte.server.coordinator import Coordinator
from lte.server.grpc_server import ParameterServer
from lte.worker.client import EXIT_JOB_OVER
from tests.cluster import DIGITS, digits_job
from tests.faults import wait_until

pytestmark = pytest.mark.process  # tier: see tests/conftest.py (lte-server and lte-worker as processes)

TOKEN = "a-token-of-sufficient-length-0123"


@contextlib.contextmanager
def server(token: str | None = None, **coordinator_kwargs) -> Iterator[ParameterServer]:
    coordinator = Coordinator(digits_job(heads=2), DIGITS, **coordinator_kwargs)
    srv = ParameterServer(coordinator, host="127.0.0.1", port=0, token=token).start()
    try:
        yield srv
    finally:
        srv.stop(grace=0.5)


def worker(address: str, *argv: str, env: dict | None = None, timeout: float = 120):
    full_env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "lte.worker.cli", "--server", address, "--threads", "1", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_worker_without_the_token_is_told_about_token_and_lte_token():
    with server(token=TOKEN) as srv:
        result = worker(srv.address, "--quiet")
    assert result.returncode == 2, result.stderr  # a credential, as README and --help say (issue 25)
    line = last_line(result)
    assert "refused the token (missing or wrong)" in line
    assert line.count("--token") == 1 and line.count("LTE_TOKEN") == 1  # the hint once


def test_a_spare_worker_is_told_the_job_is_full_stands_by_and_takes_a_head_that_frees_up(tmp_path):
    with server(heads_per_worker=2) as srv:
        c = srv.coordinator
        holder, _ = c.register({"name": "holder", "max_heads": 2})
        assert len(holder.head_ids) == 2  # every head is taken
        log = tmp_path / "spare.log"
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        cmd = [
            sys.executable,
            "-m",
            "lte.worker.cli",
            "--server",
            srv.address,
            "--threads",
            "1",
            "--name",
            "spare",
        ]
        with open(log, "w") as out:
            spare = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"}
            )
        try:
            wait_until(
                lambda: "the job is full" in log.read_text(), 120, "the spare worker to say the job is full"
            )
            assert (
                "lte-worker: " in log.read_text()
                and "standing by for a head that frees up" in log.read_text()
            )
            spare_lease = next(l for l in c.leases.values() if l.worker.get("name") == "spare")
            assert spare_lease.head_ids == [] and spare_lease.state != "expired"
            c.leave(holder.lease_id)  # the holder leaves: the spare takes its heads at once
            assert sorted(spare_lease.head_ids) == [0, 1]
            wait_until(lambda: "heads now [0, 1]" in log.read_text(), 120, "the spare worker to adopt them")
        finally:
            spare.terminate()
            assert spare.wait(timeout=60) == 130
        assert "Traceback" not in log.read_text()


def test_a_late_worker_is_told_the_job_is_over():
    with server() as srv:
        with srv.coordinator.lock:
            srv.coordinator.done = True
        result = worker(srv.address, "--quiet")
    assert result.returncode == EXIT_JOB_OVER, result.stderr
    assert last_line(result) == (
        "lte-worker: the job is over: the server finished training before this worker joined"
    )


def test_a_worker_whose_message_limit_cannot_carry_the_chunks_is_refused_after_registering():
    with server() as srv:
        result = worker(srv.address, "--quiet", env={"LTE_GRPC_MAX_MESSAGE_BYTES": "200000"})
        leased = [h.head_id for h in srv.coordinator.heads.values() if h.lease_id is not None]
        states = [lease.state for lease in srv.coordinator.leases.values()]
    assert result.returncode == 2, result.stderr
    line = last_line(result)
    assert "max_chunk_bytes 1048576" in line and "this worker's gRPC message limit of 200000" in line
    assert states == ["left"] and leased == []  # it left the job on the way out: its heads are free


def test_an_interrupted_worker_that_never_joined_does_not_claim_it_left():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    cmd = [sys.executable, "-m", "lte.worker.cli", "--server", f"127.0.0.1:{port}", "--threads", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(env, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        for line in proc.stderr:  # wait until it is retrying the connection
            if "retrying" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest
    assert "lte-worker: interrupted; stopped before joining the job" in rest
    assert "left the job" not in rest
