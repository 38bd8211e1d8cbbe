"""A stopped worker leaves in every state: joining, pulling, training, pushing, waiting for its turn.

Each state is forced deterministically: the in-process server holds the RPC the worker is in (its
handler waits on an event until the test ends), or the round is long enough to be inside
``train_round`` when the signal comes, or another worker holds the round open with its push held
back (``--delay-push``, worker/hooks.py). Two ways in:

- a real ``lte-worker`` process gets SIGINT (its Ctrl+C) and must exit 130 through its orderly path
  (the "left the job" line, its lease given back), not through ``StopWatch``'s last-resort exit;
- an in-process ``Worker`` gets ``interrupt()`` and no KeyboardInterrupt at all: what remains when
  the handler's KeyboardInterrupt is lost (raised while Python ran a ``__del__``, it is printed as
  "Exception ignored" and dropped). Before ``interrupt()`` such a worker trained on to the job's end
  and ignored every later signal (the CI failure of tests/test_fleet.py: no exit in 60 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lte.worker.client import Worker
from lte.worker.hooks import FaultInjection
from lte.worker.rpc import Interrupted
from tests.cluster import digits_job, run_in_thread, running_server, worker_processes
from tests.faults import wait_for, wait_until

pytestmark = [pytest.mark.process, pytest.mark.server]  # tier: see tests/conftest.py

EXIT_S = 60.0  # from the signal to the process's exit: generous for a loaded 2-core machine
SETUP_S = 240.0  # a worker process starting (torch import) and reaching the state under load
HOLD_S = 600.0  # a held RPC waits at most this long (released by the test long before)


@contextlib.contextmanager
def held(coordinator, method: str):
    """Every call of ``coordinator.<method>`` waits (in the server's handler thread) until the block
    ends; yields the event set when the first call arrived."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(coordinator, method)

    def holding(*args, **kwargs):
        entered.set()
        release.wait(HOLD_S)
        return original(*args, **kwargs)

    setattr(coordinator, method, holding)  # an instance attribute: the servicer looks it up per call
    try:
        yield entered
    finally:
        release.set()
        delattr(coordinator, method)


def lease_of(c, pid: int):
    with c.lock:
        leases = [l for l in c.leases.values() if l.worker.get("pid") == pid]
        return leases[-1] if leases else None


def _ctrl_c(proc: subprocess.Popen, log, last_resort_ok: bool = False) -> str:
    """SIGINT the process; it must exit 130 within EXIT_S by its own path (or, where
    ``last_resort_ok``, by StopWatch's bound). Returns its log."""
    os.kill(proc.pid, signal.SIGINT)
    started = time.monotonic()
    code = proc.wait(timeout=EXIT_S)
    text = log.read_text()
    assert code == 130, text[-2000:]
    if not last_resort_ok:
        assert "still running" not in text, text[-2000:]  # not StopWatch's last resort
    assert time.monotonic() - started < EXIT_S
    return text


def test_ctrl_c_while_joining_stops_the_worker(tmp_path):
    with (
        running_server(digits_job(heads=2), heartbeat_interval_s=0.5) as server,
        held(server.coordinator, "register") as entered,
        worker_processes(server.address, [["--max-heads", "1"]], log_dir=tmp_path) as (proc,),
    ):
        assert entered.wait(SETUP_S), "the worker never called Register"
        text = _ctrl_c(proc, tmp_path / "worker-0.log")
    assert "interrupted; stopped before joining the job" in text


def test_ctrl_c_while_pulling_leaves_the_job(tmp_path):
    with running_server(digits_job(heads=2), heartbeat_interval_s=0.5) as server:
        c = server.coordinator
        with (
            held(c, "snapshot_messages") as entered,  # the first pull: the lease exists, no bytes come
            worker_processes(server.address, [["--max-heads", "1"]], log_dir=tmp_path) as (proc,),
        ):
            assert entered.wait(SETUP_S), "the worker never pulled"
            # KNOWN (1 of 2 runs here): after its Leave, grpcio's Channel.close() can wait forever
            # for the cut pull to drain; StopWatch ends it at 20 s (exit 130, stacks in the log)
            text = _ctrl_c(proc, tmp_path / "worker-0.log", last_resort_ok=True)
            assert lease_of(c, proc.pid).state == "left"  # the Leave came first either way
    assert "interrupted; left the job" in text or "still running 20 s after SIGINT" in text


def test_ctrl_c_while_training_leaves_the_job(tmp_path):
    job = digits_job(heads=1, steps=20_000, merge_every=10_000)  # a round: 10,000 steps, far over the bound
    with running_server(job, heartbeat_interval_s=0.5) as server:
        c = server.coordinator
        with worker_processes(server.address, [["--max-heads", "1"]], log_dir=tmp_path) as (proc,):
            wait_until(lambda: (l := lease_of(c, proc.pid)) and l.state == "training", SETUP_S, "training")
            text = _ctrl_c(proc, tmp_path / "worker-0.log")
            assert lease_of(c, proc.pid).state == "left" and c.version == 0  # mid-round
    assert "interrupted; left the job" in text


def test_ctrl_c_while_pushing_leaves_the_job(tmp_path):
    with running_server(digits_job(heads=2), heartbeat_interval_s=0.5) as server:
        c = server.coordinator
        with (
            held(c, "apply_push") as entered,
            worker_processes(server.address, [["--max-heads", "1"]], log_dir=tmp_path) as (proc,),
        ):
            assert entered.wait(SETUP_S), "the worker never pushed"
            text = _ctrl_c(proc, tmp_path / "worker-0.log")
            assert lease_of(c, proc.pid).state == "left"
    assert "interrupted; left the job" in text


def test_ctrl_c_while_waiting_for_the_round_to_close_leaves_the_job(tmp_path):
    # one head each; the other worker holds its push back, so the round stays open and the
    # subject waits in a long-poll pull that the server holds
    with running_server(digits_job(heads=2), heartbeat_interval_s=0.5, heads_per_worker=1) as server:
        c = server.coordinator
        (tmp_path / "other").mkdir()
        other_args = [["--max-heads", "1", "--delay-push", "600"]]
        with worker_processes(server.address, other_args, log_dir=tmp_path / "other") as (other,):
            wait_until(lambda: (l := lease_of(c, other.pid)) and l.head_ids, SETUP_S, "the other's head")
            with worker_processes(server.address, [["--max-heads", "1"]], log_dir=tmp_path) as (proc,):
                wait_until(
                    lambda: (l := lease_of(c, proc.pid)) and l.pushes >= 1 and l.state == "waiting",
                    SETUP_S,
                    "the subject's push and its wait for the round",
                )
                assert c.version == 0
                text = _ctrl_c(proc, tmp_path / "worker-0.log")
                assert lease_of(c, proc.pid).state == "left"
    assert "interrupted; left the job" in text


# -- a lost KeyboardInterrupt: interrupt() alone stops the worker ----------------------------------
@pytest.mark.parametrize("state", ["pulling", "waiting"])
def test_an_interrupt_whose_keyboardinterrupt_was_lost_still_stops_the_worker(state):
    """``Worker.interrupt()`` is what ``StopWatch`` does on a signal; no exception reaches the
    worker's thread here, as when the handler's KeyboardInterrupt was dropped inside a ``__del__``.
    (A unary call the server holds, Register or a push, is not cancelled by it: there the
    KeyboardInterrupt, or StopWatch's bound, ends the worker.)"""
    hold = {"pulling": "snapshot_messages"}.get(state)
    with running_server(digits_job(heads=2), heartbeat_interval_s=0.5, heads_per_worker=1) as server:
        c = server.coordinator
        with held(c, hold) if hold else contextlib.nullcontext(threading.Event()) as entered:
            other = None
            if state == "waiting":  # the other head's worker never pushes: the round stays open
                other = Worker(
                    server.address, quiet=True, max_heads=1, hooks=FaultInjection(delay_push_s=HOLD_S)
                )
                other_thread, _ = run_in_thread(other.run)
                wait_until(lambda: other.head_ids, SETUP_S, "the other worker's head")
            worker = Worker(server.address, quiet=True, max_heads=1)
            thread, out = run_in_thread(worker.run)
            try:
                if state == "waiting":
                    wait_until(lambda: worker.pushes >= 1 and worker.state == "waiting", SETUP_S, "its wait")
                else:
                    assert entered.wait(SETUP_S), f"the worker never reached {state}"
                lease_id = worker.lease_id
                started = time.monotonic()
                worker.interrupt()
                thread.join(EXIT_S)
                assert not thread.is_alive(), (
                    f"the worker still runs {EXIT_S:g} s after interrupt() ({state})"
                )
                assert isinstance(out.get("error"), Interrupted), out
                assert time.monotonic() - started < EXIT_S
                if lease_id:
                    wait_for(
                        c, lambda c: c.leases[lease_id].state == "left", 10, "the lease to be given back"
                    )
            finally:
                worker.stop.set()
                if other is not None:
                    other.stop.set()
                    other_thread.join(EXIT_S)


# -- the last resort ---------------------------------------------------------------------------------
STUCK = """
import signal, sys, time
from lte.worker import cli

watch = cli.StopWatch(exit_bound_s=1.0, final_bound_s=30.0)
for sig in cli.STOP_SIGNALS:
    signal.signal(sig, cli._interrupt)
watch.start()


class Finalised:
    def __del__(self):  # the signal's KeyboardInterrupt is raised in here: Python prints and drops it
        print("in __del__", flush=True)
        while True:
            time.sleep(0.01)


def train_on():  # what the worker did next: trained on, deaf to every later signal
    while True:
        time.sleep(0.01)


Finalised()
train_on()
"""


def test_a_worker_deaf_to_its_signal_exits_130_after_the_bound_with_its_stacks(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "in __del__"
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=EXIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Exception ignored in" in err and "KeyboardInterrupt" in err  # the lost interrupt itself
    assert "lte-worker: still running 1 s after SIGINT; exiting without more cleanup" in err
    assert "in train_on" in err.split("still running", 1)[1]  # the stacks name where it was stuck
