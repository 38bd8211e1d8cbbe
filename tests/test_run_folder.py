"""A run folder belongs to one job (issue 24, item 2), with real lte-server processes: a second
server on the folder is refused in one line, a dead owner's lock is taken over with a warning,
default run names are unique, a reused --out with an export is refused unless --overwrite."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lte.server.runlock import LOCK_NAME, RunLock
from lte.server.startup import default_run_folder
from tests.faults import wait_until
from tests.test_operator_cli import assert_refused, run

SERVER = Path(sys.executable).parent / "lte-server"
# a job that waits for workers that never come: it holds its folder until it is stopped
WAITING = ["--steps", "20", "--merge-every", "10", "--port", "0", "--dashboard-port", "-1", "--quiet"]


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_server(out: Path, *extra: str) -> subprocess.Popen:
    """A real lte-server on ``out`` that has taken the folder's lock (waited for, bounded)."""
    env = {k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}
    proc = subprocess.Popen(
        [str(SERVER), "--out", str(out), *WAITING, *extra],
        cwd=out.parent,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (out / LOCK_NAME).exists() or proc.poll() is not None, 240, "the run folder lock")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM by pid (a clean exit), SIGKILL if it does not come."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.process
def test_a_second_server_on_the_same_run_folder_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    first = start_server(out)
    try:
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        second = run("server", "--out", str(out), *WAITING, cwd=tmp_path, timeout=240)
        assert_refused(second, f"--out {out}", f"in use by lte-server pid {first.pid}", "pick another --out")
        assert first.poll() is None  # the owner goes on
    finally:
        stop(first)
    assert not (out / LOCK_NAME).exists()  # the owner's clean exit gives the folder back


@pytest.mark.process
def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    lock = RunLock(tmp_path).acquire()
    assert "which is gone; taking the run folder over" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_refused_naming_the_file_to_remove(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    try:
        RunLock(tmp_path).acquire()
    except ValueError as exc:
        assert "in use by lte-server pid 1 on host elsewhere.example" in str(exc)
        assert f"remove {tmp_path / LOCK_NAME}" in str(exc)
    else:
        raise AssertionError("a live-looking lock of another host was taken")


def test_default_run_names_started_in_one_second_differ():
    start = time.strftime("%Y%m%d-%H%M%S")
    names = {default_run_folder().name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(start[:8]) for n in names)


@pytest.mark.process
def test_a_reused_out_with_an_export_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier job's model")
    refused = run("server", "--out", str(out), *WAITING, cwd=tmp_path, timeout=180)
    assert_refused(refused, f"--out {out}", "model of an earlier job", "--overwrite", "--resume")
    assert (out / "model.safetensors").read_bytes() == b"an earlier job's model"
    assert not (out / LOCK_NAME).exists()
    stop(start_server(out, "--overwrite"))  # with --overwrite it starts (and holds the folder)


def test_a_lock_with_this_very_pid_is_a_restarted_container_s_and_is_taken_over(tmp_path, capsys):
    """In a container restarted with ``--resume`` the server is pid 1 again, on the same host name."""
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    RunLock(tmp_path).acquire().release()
    assert "taking the run folder over" in capsys.readouterr().err


def test_a_reused_out_with_checkpoints_of_an_interrupted_job_is_refused_unless_overwrite(tmp_path):
    """An interrupted job leaves checkpoints and no export: a new job on its folder without --resume
    went on silently, its own first checkpoints (lower versions) were pruned at once beside the old
    ones, and ``--resume`` would then pick the old job's."""
    from lte.common.job.checks import ConfigError
    from lte.server.checkpoint import list_checkpoints, save_checkpoint
    from lte.server.runlock import check_reused_out

    out = tmp_path / "run"
    for version in (40, 45, 50):
        save_checkpoint(out / "checkpoints", version, {"version": version}, {})
    try:
        check_reused_out(out, overwrite=False, resume=False)
        raise AssertionError("a folder with another job's checkpoints was reused")
    except ConfigError as exc:
        assert "checkpoints of an earlier job (newest ckpt-0000000050)" in str(exc), exc
        assert "--resume" in str(exc) and "--overwrite" in str(exc)
    check_reused_out(out, overwrite=False, resume=True)  # continuing that job keeps them
    assert len(list_checkpoints(out / "checkpoints")) == 3
    check_reused_out(out, overwrite=True, resume=False)
    save_checkpoint(out / "checkpoints", 5, {"version": 5}, {})  # the new job's first checkpoint stays
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt-0000000005"]


@pytest.mark.process
def test_a_config_files_bad_update_guard_is_one_line_and_exit_2(tmp_path):
    """``update_guard = "bogus"`` in a config file was an 'unexpected ValueError' with a trace file
    (exit 1); the flag's choices were checked by argparse only."""
    config = tmp_path / "job.toml"
    config.write_text('update_guard = "bogus"\n')
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lte.server.cli",
            "--config",
            str(config),
            "--port",
            "0",
            "--dashboard-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "lte-server: error: --update-guard 'bogus': must be one of refuse, clip, off"
    ]
