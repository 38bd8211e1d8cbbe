"""Helpers for tests that run a real parameter server and real worker processes on loopback."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from lte.common.data.datasets import load_dataset
from lte.common.job.config import JobConfig
from lte.server.coordinator import Coordinator
from lte.server.grpc_server import ParameterServer
from lte.server.run import start_worker_processes, stop_processes

DIGITS = load_dataset("digits", seed=0)


def digits_job(**overrides) -> JobConfig:
    base = dict(
        model="mlp",
        dataset="digits",
        heads=6,
        rank=16,
        alpha=64.0,
        lr=1e-2,
        steps=200,
        merge_every=10,
        batch_size=16,
    )
    base.update(overrides)
    return JobConfig(**base).with_dataset(DIGITS)


@contextlib.contextmanager
def running_server(job: JobConfig, dataset=None, **coordinator_kwargs) -> Iterator[ParameterServer]:
    """A real gRPC server on 127.0.0.1, port 0, stopped on exit (evaluating on ``dataset``, digits by default)."""
    coordinator = Coordinator(job, DIGITS if dataset is None else dataset, **coordinator_kwargs)
    server = ParameterServer(coordinator, host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop(grace=0.5)


@contextlib.contextmanager
def worker_processes(
    address: str, per_worker_args: list[list[str]], log_dir: Path | None = None
) -> Iterator[list[subprocess.Popen]]:
    """One real ``lte-worker`` process per entry (its extra flags); terminated, then killed, by pid on exit."""
    args = [["--threads", "1", "--name", f"t{i}", *extra] for i, extra in enumerate(per_worker_args)]
    procs = start_worker_processes(address, args, log_dir)
    try:
        yield procs
    finally:
        stop_processes(procs)


def move_heads(c: Coordinator, heads: list[int], src_lease_id: str, dst_lease_id: str) -> None:
    """Move ``heads`` from one live lease to another as the scheduler's revoke and assign do
    (``LeaseTable.schedule``): both leases' epochs move on, the new holder's ``held_before`` grows."""
    with c.lock:
        src, dst = c.leases[src_lease_id], c.leases[dst_lease_id]
        for h in heads:
            src.head_ids.remove(h)
            src.epoch += 1
            dst.head_ids.append(h)
            dst.held_before.add(h)
            dst.epoch += 1
            c.heads[h].lease_id = dst.lease_id
        c.changed.notify_all()


def run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run ``fn`` in a daemon thread; the dict receives its result or exception."""
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out
