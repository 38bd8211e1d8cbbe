"""Walk the README: every shell command in a ```bash block runs here (on loopback, bounded).

Each ```bash block carries a marker on the line before it, ``<!-- readme-test: KIND -->``:

- ``run``: every command runs as written and exits 0.
- ``after-run``: the same, once a small real run exists under ``runs/<time>`` (the placeholder).
- ``long``: a block whose job, as written, takes minutes to hours here. Its commands run in a
  folder that holds the repository's ``bench/`` and ``tests/`` (linked), as written except for a
  cut budget: each training ``lte-server`` gets ``--steps 8`` (one round per head at the README's
  ``--merge-every 8``) and a free port, no dashboard, ``--out runs/readme`` (``<time>`` below it);
  ``bench/quality.py`` and ``bench/parity.py`` get ``--steps 2 --seeds 0 --eval-samples 200`` (7
  vit-micro jobs, each tested on 200 of the 10,000 test images: 70 s a job otherwise). Everything else
  (``bible``, ``lte-prepare-text`` on the whole KJV, ``lte-generate``, ``--explain-model``) runs
  as written.
- ``multi-machine``: the coordinator's block and the GPU box's block run together on loopback:
  the coordinator as written but ``--host 127.0.0.1 --port 0`` (no test listens beyond loopback)
  and ``--steps 10`` (one round per head), the box's block twice as two worker processes, with
  ``coordinator:50051`` read as the server's address, the token the coordinator's block printed,
  and ``--device cpu`` where torch sees no GPU. Not run: its ``make install TORCH_CPU=...`` line
  (it downloads CUDA torch from PyTorch's index, which this machine cannot reach, and would
  replace the test's own torch): ``make -n`` checks the target and variable instead.
- ``make``: each ``make TARGET`` exists and expands (``make -n``); ``make cluster`` also runs, with
  ``ARGS`` cutting it to 20 steps on a free port without the dashboard. Not run: ``make test``
  (it is this suite; it would run itself).
"""

from __future__ import annotations

import json
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

# tier (tests/conftest.py): every block runs, or parses through, a real command
pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = re.compile(r"<!-- readme-test: ([a-z-]+) -->")
KINDS = {"run", "after-run", "multi-machine", "make", "long"}


def bash_blocks() -> list[tuple[int, str, str]]:
    """``(line, kind, body)`` of every ```bash block; kind is '' where the marker is missing."""
    lines = (ROOT / "README.md").read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            end = lines.index("```", i + 1)
            blocks.append((i + 1, marker[1] if marker else "", "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def commands(body: str) -> list[str]:
    """The block's command lines as written (bash reads their comments), continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


BLOCKS = bash_blocks()


def by_kind(kind: str) -> list[tuple[int, str]]:
    return [(line, body) for line, k, body in BLOCKS if k == kind]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}
    out.update(OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return out


def run_line(command: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env()
    )


def test_every_bash_block_is_marked_and_every_kind_is_walked():
    unmarked = [line for line, kind, _ in BLOCKS if kind not in KINDS]
    assert unmarked == [], f"README.md ```bash blocks at lines {unmarked} need <!-- readme-test: KIND -->"
    assert {kind for _, kind, _ in BLOCKS} == KINDS  # each kind below has something to check


@pytest.mark.parametrize("line, body", by_kind("run"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_run_blocks_run_as_written(tmp_path, line, body):
    for command in commands(body):
        result = run_line(command, tmp_path)
        assert result.returncode == 0, (f"README.md:{line}: {command}", result.stderr[-2000:])


def test_after_run_blocks_run_on_a_real_run(tmp_path):
    # a small real run of the README's own job shape: an MLP on Fashion-MNIST, local workers
    made = run_line(
        "lte-server --model mlp --dataset fashion-mnist --heads 2 --steps 20 --local-workers 1 "
        "--port 0 --dashboard-port -1 --out runs/readme",
        tmp_path,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    for line, body in by_kind("after-run"):
        for command in commands(body):
            result = run_line(command.replace("<time>", "readme"), tmp_path)
            assert result.returncode == 0, (f"README.md:{line}: {command}", result.stderr[-2000:])


BOUND_S = 600  # a cut block on a loaded 2-core machine (start-ups of torch processes dominate)
TRAINING_CUT = [
    "--steps",
    "8",
    "--port",
    "0",
    "--dashboard-port",
    "-1",
    "--linger",
    "0",
    "--out",
    "runs/readme",
]
BENCH_CUT = ["--steps", "2", "--seeds", "0", "--eval-samples", "200"]


def cut(command: str) -> str:
    """A long block's command with its budget cut (this file's docstring says how)."""
    words = shlex.split(command, comments=True)
    if "lte-server" in words and "--explain-model" not in words:
        command = f"{command.split('#')[0].rstrip()} {shlex.join(TRAINING_CUT)}"
    elif any(w.startswith("bench/") for w in words):
        command = f"{command.split('#')[0].rstrip()} {shlex.join(BENCH_CUT)}"
    return command.replace("<time>", "readme")


@pytest.mark.timeout(BOUND_S * 2)
@pytest.mark.parametrize("line, body", by_kind("long"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_long_blocks_run_with_their_budget_cut(tmp_path, line, body):
    for shared in ("bench", "tests"):  # what `python bench/...` and `PYTHONPATH=.` find at the root
        (tmp_path / shared).symlink_to(ROOT / shared)
    for command in commands(body):
        result = run_line(cut(command), tmp_path, timeout=BOUND_S)
        assert result.returncode == 0, (f"README.md:{line}: {cut(command)}", result.stderr[-2000:])


def substitute(text: str, old: str, new: str) -> str:
    assert old in text, f"README.md's multi-machine blocks no longer say {old!r}: update this test"
    return text.replace(old, new)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(predicate, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + BOUND_S
    while not (value := predicate()):
        assert proc.poll() is None, (
            f"{what}: the coordinator's block exited {proc.returncode}:\n{read(log)[-3000:]}"
        )
        assert time.monotonic() < deadline, f"no {what} in {BOUND_S} s:\n{read(log)[-3000:]}"
        time.sleep(0.1)
    return value


@pytest.mark.timeout(BOUND_S * 2)
def test_multi_machine_blocks_run_on_loopback(tmp_path):
    (coordinator,) = [body for _, body in by_kind("multi-machine") if "lte-server" in body]
    (box,) = [body for _, body in by_kind("multi-machine") if "lte-worker" in body]
    for body in (coordinator, box):
        syntax = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=30)
        assert syntax.returncode == 0, syntax.stderr
    server = "\n".join(commands(coordinator))
    assert server.splitlines()[-1].startswith("lte-server "), server  # the cut goes on its line
    server = substitute(server, "--host 0.0.0.0", "--host 127.0.0.1")  # loopback only
    server = substitute(server, "--port 50051", "--port 0")
    server += " --steps 10 --dashboard-port -1 --linger 0 --out runs/multi"
    log = tmp_path / "coordinator.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", server], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env(),
            start_new_session=True,
        )  # fmt: skip
    workers: list[subprocess.Popen] = []
    try:
        token = wait_for(lambda: re.search(r"^([0-9a-f]{48})$", read(log), re.M), "token", proc, log)[1]
        address = wait_for(
            lambda: re.search(r"serving lte\.v1\.ParameterServer on (\S+)", read(log)), "address", proc, log
        )[1]
        lines = commands(box)
        install = [c for c in lines if c.startswith("make install")]
        assert len(install) == 1, lines  # not run (see the docstring): the target and its variable expand
        dry = subprocess.run(
            ["make", "-n", *shlex.split(install[0])[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert dry.returncode == 0, dry.stderr
        script = "\n".join(c for c in lines if c not in install)
        script = substitute(script, ". .venv/bin/activate", f". {shlex.quote(str(BIN / 'activate'))}")
        script = substitute(script, "the-token-printed-on-the-coordinator", token)
        script = substitute(script, "coordinator:50051", address)
        if not torch.cuda.is_available():
            script = substitute(script, "--device cuda:0", "--device cpu")
        for i in range(2):  # two boxes of 4 heads each, as the README says
            with open(tmp_path / f"box-{i}.log", "w") as out:
                workers.append(
                    subprocess.Popen(
                        ["bash", "-c", script],
                        cwd=tmp_path,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env(),
                        start_new_session=True,
                    )  # fmt: skip
                )
        code = proc.wait(timeout=BOUND_S)
        assert code == 0, read(log)[-3000:]
        for i, worker in enumerate(workers):
            assert worker.wait(timeout=120) == 0, read(tmp_path / f"box-{i}.log")[-3000:]
    finally:
        for p in (proc, *workers):  # the groups this test started (each its own session)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    summary = json.loads((tmp_path / "runs" / "multi" / "summary.json").read_text())
    assert summary["test_accuracy"] is not None and summary["version"] >= 1, summary
    checked = read(tmp_path / "box-0.log").splitlines()[0]  # the block's torch check ran
    assert re.fullmatch(r"\S+ (True|False)", checked), checked


@pytest.mark.timeout(BOUND_S * 2)
@pytest.mark.parametrize("line, body", by_kind("make"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_make_blocks_name_real_targets_and_make_cluster_runs(tmp_path, line, body):
    venv = f"VENV={BIN.parent}"
    for command in commands(body):
        words = shlex.split(command, comments=True)
        assert words[0] == "make", (f"README.md:{line}", command)
        result = subprocess.run(
            ["make", "-n", venv, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (f"README.md:{line}: {command}", result.stderr)
    if "make cluster" not in body:
        return
    ready = subprocess.run(["make", "-q", venv, "install", "data"], cwd=ROOT, capture_output=True, timeout=60)
    assert ready.returncode == 0, "make install (and data) first: this test runs make cluster, not pip"
    args = f"--steps 20 --dashboard-port -1 --linger 0 --out {tmp_path / 'cluster'}"
    log = tmp_path / "make-cluster.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["make", venv, "cluster", f"ARGS={args}"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env=env(), start_new_session=True,
        )  # fmt: skip
    try:
        code = proc.wait(timeout=BOUND_S)
    finally:
        if proc.poll() is None:  # make, lte-server and its workers: the group this test started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, (f"README.md:{line}: make cluster", read(log)[-3000:])
    summary = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    assert summary["test_accuracy"] is not None and summary["version"] == 2, summary  # 20 steps / T 10
