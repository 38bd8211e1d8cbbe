"""The files of the package one sync training round passes through, found by tracing it, and the
service's surface into the ``Coordinator``, counted from the code: README's Architecture section
lists both, and these tests keep it true."""

from __future__ import annotations

import ast
import re
import sys
import threading
from pathlib import Path

import pytest

from lte.server.coordinator import Coordinator
from lte.server.grpc_server import ParameterServer
from lte.worker.client import Worker
from tests.cluster import DIGITS, digits_job

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("server", "worker", "common", "commands", "proto")  # lte.<dir> is <dir>/ in the repository
FILE = re.compile(r"`((?:server|worker|common|proto)/[\w/]+\.py)`")


def _repo_path(filename: str) -> str | None:
    """``common/core/layers.py`` for a module file of the package (through the editable install's links)."""
    path = Path(filename).resolve()
    try:
        rel = path.relative_to(ROOT)
    except ValueError:
        return None
    return str(rel) if rel.parts[0] in PACKAGE_DIRS else None


def _in_round(thread: str) -> bool:
    """The round's threads: the worker's (this one) and the gRPC server's handlers (``lte-rpc``);
    not the background ones (heartbeats, the scheduler's clock, evaluation, checkpoints)."""
    return thread.startswith("lte-rpc") or not thread.startswith("lte-")


def _readme_round_files() -> set[str]:
    """The files README's Architecture section lists as those a round passes through (the file
    column of its table)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture") :]
    table = section[section.index("| step | file |") : section.index("The gRPC service calls")]
    return {f for row in table.splitlines() if row.startswith("|") for f in FILE.findall(row.split("|")[2])}


@pytest.mark.server
def test_one_sync_round_passes_through_the_files_readme_lists():
    """Trace the Python calls of one round in this process: the worker trains its head, pushes, the
    server validates and merges, the worker pulls the new version (the gRPC handler threads are
    traced too). Background threads (heartbeats, the scheduler's clock) are not the round."""
    job = digits_job(heads=1, steps=8, merge_every=4)  # two rounds of one head: a push closes each
    seen: set[str] = set()
    window = threading.Event()  # set while the round runs

    def tracer(frame, event, arg):
        if window.is_set() and event == "call" and _in_round(threading.current_thread().name):
            path = _repo_path(frame.f_code.co_filename)
            if path is not None:
                seen.add(path)
        return None  # calls only: no line events

    threading.settrace(tracer)  # every thread started from now on: the gRPC server's handlers too
    try:
        coordinator = Coordinator(job, DIGITS)
        with ParameterServer(coordinator, host="127.0.0.1", port=0) as server:
            worker = Worker(server.address, quiet=True, show_progress=False)
            try:
                worker.register()  # and the first pull: before the round
                turn = worker.turns[0]
                sys.settrace(tracer)
                window.set()
                stats = turn.trainer.train_round()
                reply = worker.push(turn, stats)
                turn.trainer.commit()
                worker.next_rounds[turn.head_ids[0]] += 1
                pulled = worker.pull(wait_s=0.0)  # version 1, the round's merge
                window.clear()
                sys.settrace(None)
            finally:
                worker.stop.set()
                worker.leave()
    finally:
        window.clear()
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    assert pulled and worker.version == 1
    assert reply.applied and reply.version == 1 and coordinator.version == 1
    seen = {p for p in seen if not p.endswith("__init__.py") and "_pb2" not in p}
    listed = _readme_round_files()
    assert seen <= listed, f"README's Architecture section misses {sorted(seen - listed)}"
    assert listed <= seen, f"README lists files the round does not pass through: {sorted(listed - seen)}"


def _coordinator_calls(function: ast.FunctionDef) -> set[str]:
    """Names of ``self.c.<method>(...)`` calls in a service handler."""
    return {
        node.func.attr
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "c"
    }


def test_the_service_calls_six_coordinator_methods_for_a_pull_and_a_push():
    tree = ast.parse((ROOT / "server" / "service.py").read_text())
    handlers = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    pull, push = _coordinator_calls(handlers["PullModel"]), _coordinator_calls(handlers["PushUpdate"])
    assert pull == {"begin_pull", "wait_for_version", "pull_snapshot", "count_sent"}
    assert push == {"begin_push", "apply_push"}
    assert all(callable(getattr(Coordinator, name)) for name in pull | push)
