"""Issue 25: the "continue with: ..." command that lte-server prints at SIGTERM or Ctrl+C resumes the
job when pasted as printed (run verbatim through bash), for each zoo family (mlp, vit, gpt), in a
run folder whose name holds a space (issue 24: the command is shell-quoted).

Each job: a first server is stopped by SIGTERM once it has a checkpoint; the printed command
resumes it; that one is stopped by SIGINT (Ctrl+C) once it has checkpointed past the resumed
version; the command it prints resumes again and runs the job to its end. Workers are real
``lte-worker`` processes started by the test (slowed down while a signal is due, so the job cannot
end first on a fast machine; at full speed for the last part), stopped by pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lte.common.data.text import ByteTokenizer, write_token_files
from lte.server.checkpoint import latest_checkpoint
from tests.cluster import worker_processes
from tests.faults import wait_until

pytestmark = pytest.mark.timeout(900)  # three servers, each bounded below

BOUND_S = 240  # each wait; a loaded 2-core machine starts a torch process in 10-30 s
BIN = Path(sys.executable).parent  # lte-server of this environment, on PATH as after activation

COMMON = [
    "--heads", "2", "--rank", "4", "--alpha", "16", "--merge-every", "2", "--steps", "24",
    "--batch-size", "8", "--lr", "1e-2", "--port", "0", "--dashboard-port", "-1",
    "--checkpoint-every", "1", "--eval-every", "0", "--linger", "0",
]  # fmt: skip


def gpt_data(folder: Path) -> Path:
    text = "In the beginning God created the heaven and the earth. And the earth was without form. " * 60
    write_token_files(folder, [text], ByteTokenizer())
    return folder


FAMILIES = {  # the job's flags; a worker's own flags
    "mlp": lambda tmp: (["--model", "mlp", "--dataset", "digits"], []),
    "vit": lambda tmp: (["--model", "vit-micro", "--dataset", "digits"], []),  # patch_size resolved: 2
    "gpt": lambda tmp: (
        ["--model", "gpt-micro", "--dataset", "text", "--data-dir", str(data := gpt_data(tmp / "kjv tiny"))]
        + ["--context", "16"],
        ["--data-dir", str(data)],
    ),
}


def env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def address_of(log: Path) -> str | None:
    match = re.search(r"serving lte\.v1\.ParameterServer on (\S+)", read(log))
    return match.group(1) if match else None


def printed_command(log: Path) -> str:
    match = re.search(r"continue with: (.+)$", read(log), re.MULTILINE)
    assert match, f"no 'continue with' line in {log}:\n{read(log)[-3000:]}"
    return match.group(1).strip()


def newest_version(run: Path) -> int:
    path = latest_checkpoint(run / "checkpoints")
    return -1 if path is None else int(path.name.split("-")[1])


def serve(command: list[str] | str, log: Path, cwd: Path) -> subprocess.Popen:
    """lte-server (a list), or a printed command line run verbatim by bash (which execs it)."""
    argv = command if isinstance(command, list) else ["bash", "-c", command]
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env())


def interrupt(proc: subprocess.Popen, sig: signal.Signals, log: Path) -> int:
    assert "lte-server" in Path(f"/proc/{proc.pid}/cmdline").read_text(), "bash did not exec the command"
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"lte-server did not stop on {sig.name}:\n{read(log)[-3000:]}") from None


def phase(command, log: Path, cwd: Path, run: Path, *, worker_args: list[str], stop: signal.Signals | None):
    """Serve ``command`` with one worker; stop it by ``stop`` once it checkpointed past where it
    started, or let the job end. Returns (exit code, the version it started at)."""
    proc = serve(command, log, cwd)
    try:
        wait_until(
            lambda: address_of(log) or proc.poll() is not None, BOUND_S, f"the server's address in {log}"
        )
        assert proc.poll() is None, read(log)[-3000:]
        start = newest_version(run)
        (workers := log.parent / f"{log.stem}-worker").mkdir()
        with worker_processes(address_of(log), [worker_args], log_dir=workers) as procs:
            if stop is None:
                return proc.wait(timeout=BOUND_S * 2), start
            wait_until(
                lambda: newest_version(run) > start or proc.poll() is not None or procs[0].poll() is not None,
                BOUND_S,
                "a new checkpoint",
            )
            assert procs[0].poll() is None, read(workers / "worker-0.log")[-3000:]
            assert proc.poll() is None, f"the job ended before {stop.name}:\n{read(log)[-3000:]}"
            return interrupt(proc, stop, log), start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.process
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_printed_resume_command_continues_the_job_after_sigterm_and_ctrl_c(
    tmp_path, family, capsys, monkeypatch
):
    cwd = tmp_path / "work dir"
    cwd.mkdir()
    (log_dir := tmp_path / "logs").mkdir()
    run = cwd / "runs" / f"{family} 'first' run"  # a space and quotes: the command must be quoted
    job, own = FAMILIES[family](tmp_path)
    slow = ["--quiet", "--slow-down", "1.0", *own]  # >= 10 s of rounds left after any checkpoint
    first = [str(BIN / "lte-server"), *job, *COMMON, "--out", str(run)]

    code, _ = phase(first, log_dir / "1.log", cwd, run, worker_args=slow, stop=signal.SIGTERM)
    assert code == 130, read(log_dir / "1.log")[-3000:]
    assert "terminate called" not in read(log_dir / "1.log")
    command = printed_command(log_dir / "1.log")
    assert command.startswith("lte-server --config ") and "--resume" in command

    code, resumed_at = phase(command, log_dir / "2.log", cwd, run, worker_args=slow, stop=signal.SIGINT)
    assert f"resumed at version {resumed_at}" in read(log_dir / "2.log"), read(log_dir / "2.log")[-3000:]
    assert code == 130, read(log_dir / "2.log")[-3000:]
    assert "terminate called" not in read(log_dir / "2.log")  # an orderly stop, no native abort
    again = printed_command(log_dir / "2.log")

    code, resumed_at = phase(again, log_dir / "3.log", cwd, run, worker_args=["--quiet", *own], stop=None)
    log = read(log_dir / "3.log")
    assert code == 0, log[-3000:]
    assert f"resumed at version {resumed_at}" in log and resumed_at >= 2, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["version"] == 12  # 24 steps / T=2: every round once, none lost or repeated
    config = (run / "config.toml").read_text()
    assert "patch_size = 0" not in config and "warmup_steps = -1" not in config, config
    if family != "gpt":  # a language model has no image size: its 0 there is no placeholder
        assert "image_size = 0" not in config, config
    if family == "vit":
        assert "patch_size = 2" in config, config
    # `--resume RUN` alone: the run's own config.toml, nothing retyped
    from lte.server.cli import main

    monkeypatch.chdir(cwd)
    assert main(["--resume", str(run), "--print-config"]) == 0
    printed = capsys.readouterr().out
    for line in config.splitlines():
        key = line.split(" = ")[0]
        if key in ("model", "patch_size", "steps", "warmup_steps", "data_dir", "heads", "image_size"):
            assert line in printed.splitlines(), (line, printed)
