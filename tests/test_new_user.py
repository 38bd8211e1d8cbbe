"""Issue 25 (a new user's path) and issue 24 items 3, 6 and 7: clocks, exit codes, signals, files."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lte.common.wire.protocol import PushMeta
from lte.server.coordinator import Coordinator
from lte.server.status import job_status
from tests.cluster import DIGITS, digits_job
from tests.faults import FakeClock, group_gone, wait_until

BOUND_S = 240  # every wait on a loaded 2-core machine
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def push_rounds(c: Coordinator, lease, rounds: int, clock: FakeClock, seconds_per_round: float) -> None:
    """``rounds`` sync rounds of a one-head job, each ``seconds_per_round`` of the fake clock."""
    tensors = {name: torch.zeros(shape) for name, shape in c.expected_tensors([0]).items()}
    for _ in range(rounds):
        clock.advance(seconds_per_round)
        r = c.heads[0].next_round
        assert c.apply_push(PushMeta(lease.lease_id, c.version, {0: r}, 10, 160, 1.0, 1.0), tensors)[
            "applied"
        ]


def test_a_wall_clock_stepped_back_never_shows_a_negative_elapsed_time_nor_reaches_a_checkpoint(
    tmp_path, monkeypatch
):
    """Issue 24 item 6: durations and rates come from the monotonic clock; the wall clock (here
    stepped back a day mid-job) is a timestamp only."""
    clock = FakeClock()
    c = Coordinator(digits_job(heads=1, steps=100), None, clock=clock, checkpoint_dir=tmp_path / "ckpt")
    lease, _ = c.register({})
    push_rounds(c, lease, 3, clock, seconds_per_round=2.0)
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall - 86_400.0)  # NTP or a user sets the clock back
    push_rounds(c, lease, 2, clock, seconds_per_round=2.0)
    st = c.status()
    assert st["elapsed_s"] == pytest.approx(10.0)  # 5 rounds of 2 s, whatever the wall clock says
    assert [r["time"] for r in st["history"]] == pytest.approx([2.0, 4.0, 6.0, 8.0, 10.0])
    assert job_status(st).merges_per_minute == pytest.approx(30.0)  # 5 merges in 10 s
    path = c.save_checkpoint()
    import json

    assert json.loads((path / "state.json").read_text())["elapsed_s"] == pytest.approx(10.0)
    resumed = Coordinator(digits_job(heads=1, steps=100), None, clock=clock)
    from lte.server.checkpoint import load_checkpoint

    resumed.restore(*load_checkpoint(path))
    clock.advance(1.0)
    assert resumed.status()["elapsed_s"] == pytest.approx(11.0)  # carried across the resume
    c.close()


def test_the_elapsed_clock_stops_at_the_end_and_the_eta_comes_from_the_measured_rate():
    """Issue 25 item 6: a 47 s job showed 3 min 56 s on a dashboard left open; long jobs had no ETA."""
    clock = FakeClock()
    job = digits_job(heads=1, steps=40)  # 4 rounds
    c = Coordinator(job, None, clock=clock)
    lease, _ = c.register({})
    assert c.status()["eta_s"] is None  # no rate measured yet
    push_rounds(c, lease, 1, clock, seconds_per_round=5.0)
    assert c.status()["eta_s"] == pytest.approx(15.0)  # 3 rounds left at 5 s each
    push_rounds(c, lease, 3, clock, seconds_per_round=5.0)
    assert c.done
    clock.advance(3600.0)  # the dashboard stays open an hour
    st = c.status()
    assert st["elapsed_s"] == pytest.approx(20.0) and st["eta_s"] == 0.0
    doc = job_status(st)
    assert doc.elapsed_s == pytest.approx(20.0) and doc.merges_per_minute == pytest.approx(12.0)
    c.close()


def lte_worker(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}
    env.update(env_extra or {}, OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(BIN / "lte-worker"), *args], capture_output=True, text=True, timeout=BOUND_S, env=env
    )


@pytest.mark.server
def test_a_missing_or_wrong_token_exits_2_with_one_line_and_the_hint_once():
    from lte.server.grpc_server import ParameterServer

    token = "the-right-token-of-24-chars"
    c = Coordinator(digits_job(heads=2), DIGITS)
    server = ParameterServer(c, host="127.0.0.1", port=0, token=token).start()
    try:
        for env in ({}, {"LTE_TOKEN": "a-wrong-token-of-24-chars"}):
            result = lte_worker("--server", server.address, "--give-up-after", "30", env_extra=env)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, result.stderr
            assert len(lines) == 1 and "refused the token" in lines[0], result.stderr
            assert lines[0].count("LTE_TOKEN") == 1, lines[0]  # the hint once
    finally:
        server.stop(grace=0.5)


def test_a_host_name_that_does_not_resolve_is_a_configuration_error_within_seconds(capsys):
    from lte.worker import startup
    from lte.worker.cli import main

    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(startup, "RESOLVE_BOUND_S", 2.0)
        mp.setattr(startup.check_resolves, "__defaults__", (2.0, 0.5))
        assert main(["--server", "no-such-host.invalid:50051", "--give-up-after", "300"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert time.monotonic() - started < 60  # not the 300 s of an outage
    assert len(err) == 1 and "'no-such-host.invalid' does not resolve" in err[0], err


def test_a_give_up_after_shorter_than_the_resolve_bound_is_the_bound():
    """A worker told --give-up-after 3 waited the resolve check's full 10 s (README walk-through)."""
    from lte.common.job.checks import ConfigError
    from lte.worker.startup import check_resolves

    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"does not resolve \(.*, for 0\.5 s\)"):
        check_resolves("no-such-host.invalid:50051", bound_s=30.0, poll_s=0.1, at_most_s=0.5)
    assert time.monotonic() - started < 20  # far below the 30 s bound (a slow resolver's one try aside)


def test_the_exported_model_respects_the_umask(tmp_path):
    """Issue 25: model.safetensors was written 0600 whatever the umask."""
    c = Coordinator(digits_job(heads=2), DIGITS)
    old = os.umask(0o022)
    try:
        path = c.export(tmp_path / "model.safetensors")
    finally:
        os.umask(old)
        c.close()
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.process
def test_prepared_text_data_is_git_ignored():
    for path in ("data/kjv/kjv.txt", "data/kjv/train.bin"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
        assert result.returncode == 0, f"make lm-cluster's {path} must be git-ignored"


# -- signals: the whole process group, as a terminal sends them ------------------------------------


def server_command(out: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "lte-server"), "--model", "mlp", "--dataset", "digits", "--heads", "2", "--rank", "4",
        "--steps", "100000", "--merge-every", "2", "--batch-size", "8", "--local-workers", "2",
        "--port", "0", "--dashboard-port", "-1", "--checkpoint-every", "1", "--linger", "0",
        "--out", str(out), *extra,
    ]  # fmt: skip


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if not group_gone(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started (its own session)


def _from_a_terminal() -> None:
    """The child starts as from an interactive shell: SIGHUP at its default, whatever this test run
    was started with (under ``nohup make test`` it is ignored, and nohup's job must ignore it)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.process
def test_sighup_stops_the_server_and_its_local_workers_with_a_checkpoint(tmp_path):
    """Issue 24 item 3: a closed terminal sends SIGHUP to the job's process group; the server and
    its local workers used to die at once with no checkpoint and no message."""
    out = tmp_path / "run"
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            server_command(out),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_from_a_terminal,
        )
    try:
        wait_until(
            lambda: list((out / "checkpoints").glob("ckpt-*")) or proc.poll() is not None,
            BOUND_S,
            "a checkpoint",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGHUP)  # the whole group: server and local workers
        assert proc.wait(timeout=BOUND_S) == 130, log.read_text()[-3000:]
        wait_until(lambda: group_gone(proc.pid), 60, "the local workers to exit")
    finally:
        stop_group(proc)
    text = log.read_text()
    assert re.search(r"continue with: \S*lte-server --config", text), text[-3000:]
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]
    for worker_log in out.glob("worker-*.log"):
        assert "Traceback" not in worker_log.read_text(), worker_log.read_text()[-2000:]


def evaluated(out: Path) -> bool:
    metrics = out / "metrics.jsonl"
    return metrics.exists() and '"eval": true' in metrics.read_text()


@pytest.mark.process
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Fashion-MNIST")
def test_ctrl_c_on_a_terminal_during_evaluations_stops_in_order_without_a_native_abort(tmp_path):
    """Issue 25 item 3: Ctrl+C of a ViT server (its output on a terminal: a pty here) while it
    evaluates Fashion-MNIST's 10,000 test images after every merge: exit 130, a checkpoint and the
    resume line, and no ``terminate called without an active exception`` (exit 134)."""
    import pty

    out = tmp_path / "run"
    command = server_command(out, "--eval-every", "1")
    command[command.index("mlp")] = "vit-micro"
    command[command.index("digits")] = "fashion-mnist"
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        command, stdin=follower, stdout=follower, stderr=follower, start_new_session=True, cwd=tmp_path
    )
    os.close(follower)
    chunks: list[bytes] = []

    def drain() -> str:
        import select

        while select.select([leader], [], [], 0)[0]:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the pty closed: every writer has exited
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    try:
        wait_until(
            lambda: (
                (drain() and evaluated(out) and list((out / "checkpoints").glob("ckpt-*")))
                or proc.poll() is not None
            ),
            BOUND_S,
            "a checkpoint and an evaluation",
        )
        assert proc.poll() is None, drain()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C does: the terminal's foreground group
        deadline = time.monotonic() + BOUND_S
        while proc.poll() is None and time.monotonic() < deadline:
            drain()
            time.sleep(0.05)  # reading the pty while it runs (a full pty would block the server)
        code = proc.wait(timeout=5)
        wait_until(lambda: group_gone(proc.pid), 60, "the local workers to exit")
    finally:
        stop_group(proc)
        text = drain()
        os.close(leader)
    assert code == 130, text[-3000:]
    assert re.search(r"continue with: \S*lte-server --config", text), text[-3000:]
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]


def test_routine_scheduling_is_logged_at_info_and_off_a_terminal_the_dashboard_says_it_closes(caplog):
    """Issue 25 item 6: a head moved off turns is routine (info, not a warning); with no linger the
    log says the dashboard closes now and how to keep it."""
    import logging

    from lte.server.finish import linger

    clock = FakeClock()
    c = Coordinator(digits_job(heads=4), None, lease_timeout_s=30.0, heartbeat_interval_s=1.0, clock=clock)
    caplog.set_level(logging.INFO, logger="lte.server")
    a, _ = c.register({"max_heads": 2})
    clock.advance(31.0)
    c.heartbeat(a.lease_id, 0, 0.0, "training")  # a takes all 4 heads in turns
    c.register({"max_heads": 2})  # a worker with room: two heads move off turns
    moved = [r for r in caplog.records if "taken from" in r.getMessage()]
    assert len(moved) == 2 and {r.levelno for r in moved} == {logging.INFO}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    linger(0.0, "http://127.0.0.1:8080/")
    closing = [r for r in caplog.records if "closes now" in r.getMessage()]
    assert len(closing) == 1 and "--linger" in closing[0].getMessage()
    c.close()


def test_a_checkpoint_with_placeholders_resumes_into_the_resolved_job_and_a_real_difference_is_refused(
    tmp_path,
):
    """Issue 25 item 1: a checkpoint of an older server holds ``patch_size = 0`` and
    ``warmup_steps = -1``; the run's config.toml (and a server now) the values they stand for."""
    import dataclasses

    from lte.common.job.config import job_from_dict
    from lte.common.job.run_metadata import resolved_job
    from lte.server.checkpoint import load_checkpoint

    old_job = digits_job(model="vit-micro", heads=2, steps=20)
    assert old_job.patch_size == 0 and old_job.warmup_steps == -1
    old = Coordinator(old_job, None, checkpoint_dir=tmp_path)
    path = old.save_checkpoint()
    old.close()
    job = job_from_dict(resolved_job(old_job))
    assert job.patch_size == 2 and job.warmup_steps == 1
    resumed = Coordinator(job, None)
    resumed.restore(*load_checkpoint(path))  # the same job, compared resolved
    other = Coordinator(dataclasses.replace(job, patch_size=4), None)
    with pytest.raises(ValueError, match=r"patch_size \(checkpoint 2, now 4\)"):
        other.restore(*load_checkpoint(path))
    for c in (resumed, other):
        c.close()


def test_stopping_cancels_an_evaluation_in_progress_and_joins_its_thread(monkeypatch):
    """Issue 25 item 3: the evaluation thread must not outlive the server's stop (it ran native code
    while the interpreter exited: ``terminate called without an active exception``)."""
    import threading

    from lte.server import evaluation

    started, real = threading.Event(), evaluation.evaluate
    batches = []

    def evaluate(model, *args, **kwargs):
        model.register_forward_pre_hook(lambda m, a: batches.append(1))
        started.set()
        return real(model, *args, batch_size=1, **kwargs)  # one image per batch: a long evaluation

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    c = Coordinator(digits_job(model="vit-micro", heads=2), DIGITS)
    c.evaluations.start()
    c.evaluations.poke()
    assert started.wait(BOUND_S)
    wait_until(lambda: batches, BOUND_S, "the evaluation's first batch")
    c.stop_background()
    assert not c.evaluations.task._thread.is_alive()  # joined, not left running
    assert len(batches) < len(DIGITS.test_y)  # cancelled: it did not run to the end
    assert c.evals == []
    monkeypatch.setattr(evaluation, "evaluate", real)
    assert c.evaluate_now()["test_accuracy"] is not None  # a stopped coordinator still evaluates
    c.close()


def test_a_checkpoint_from_before_reset_optimizer_refuses_a_resume_that_turns_it_on(tmp_path):
    """A checkpoint whose job has no ``reset_optimizer`` (written before the option existed) trained
    with it off: resuming it with ``--reset-optimizer`` is another job, as it is for a checkpoint
    that holds ``reset_optimizer = false``; resuming it with the option off goes on."""
    import dataclasses

    from lte.server.checkpoint import load_checkpoint

    job = digits_job(heads=2, steps=20)
    old = Coordinator(job, None, checkpoint_dir=tmp_path)
    path = old.save_checkpoint()
    old.close()
    state, tensors = load_checkpoint(path)
    del state["job"]["reset_optimizer"]  # what a checkpoint of the older server holds
    resumed = Coordinator(job, None)
    resumed.restore(state, tensors)
    other = Coordinator(dataclasses.replace(job, reset_optimizer=True), None)
    with pytest.raises(ValueError, match=r"reset_optimizer \(checkpoint False, now True\)"):
        other.restore(state, tensors)
    for c in (resumed, other):
        c.close()


def test_the_resume_command_runs_in_a_shell_that_did_not_activate_the_venv(tmp_path, monkeypatch):
    """README "Stopping and resuming": the printed command pastes as is. After Ctrl+C of ``make
    cluster`` (which runs .venv/bin/lte-server, .venv/bin off the PATH) it used to say a bare
    ``lte-server``: "command not found" in that very shell. Off the PATH it names this environment's
    lte-server by its absolute path; where the PATH finds that same one, the short name."""
    from lte.server.run import resume_command

    run = tmp_path / "runs" / "a run"
    monkeypatch.setenv("PATH", os.defpath)  # a shell that did not activate the .venv
    program, *rest = shlex.split(resume_command(run))
    assert program == str((BIN / "lte-server").absolute()), program
    assert os.access(program, os.X_OK)
    assert rest == ["--config", str(run / "config.toml"), "--resume", str(run)]
    monkeypatch.setenv("PATH", f"{BIN.absolute()}{os.pathsep}{os.defpath}")  # after . .venv/bin/activate
    assert shlex.split(resume_command(run))[0] == "lte-server"
