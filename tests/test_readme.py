"""Walk the README: every shell command in a ```bash block runs here (on loopback, bounded) or,
for blocks marked multi-machine, is checked against the real parser and start-up checks.

Each ```bash block carries a marker on the line before it, ``<!-- readme-test: KIND -->``:

- ``run``: every command runs as written and exits 0.
- ``after-run``: the same, once a small real run exists under ``runs/<time>`` (the placeholder).
- ``multi-machine``: ``bash -n`` on the block; each ``lte-*`` command parses with that tool's
  parser, lte-server's passes every start-up check (``--print-config`` with a valid token),
  lte-worker's passes the worker's own checks.
- ``make``: each ``make TARGET`` exists and expands (``make -n``); running it is `make test`'s job.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def _parse(tool: str, argv: list[str]):
    module = {"lte-server": "lte.server.cli", "lte-worker": "lte.worker.cli", "lte-sim": "lte.commands.sim"}
    import importlib

    parser = importlib.import_module(module[tool]).build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"{tool} {shlex.join(argv)}: not accepted by its --help ({exc.code})") from None


@pytest.mark.parametrize(
    "line, body", by_kind("multi-machine"), ids=lambda v: str(v) if isinstance(v, int) else ""
)
def test_multi_machine_blocks_parse_and_pass_the_start_up_checks(line, body):
    syntax = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, (f"README.md:{line}", syntax.stderr)
    checked, before = 0, []  # the block's shell lines so far (export LTE_TOKEN=...) run before a server
    for command in commands(body):
        words = shlex.split(command, comments=True)
        if not words[0].startswith("lte-"):
            before.append(command)
            continue
        args = _parse(words[0], words[1:])
        if words[0] == "lte-server":  # every start-up check, with the token the block itself made
            script = "\n".join([*before, f"{shlex.join(words)} --print-config"])
            result = run_line(script, ROOT, timeout=120)
            assert result.returncode == 0, (f"README.md:{line}: {command}", result.stderr)
        elif words[0] == "lte-worker":
            from lte.worker.startup import check_worker_args

            check_worker_args(args)
        checked += 1
    assert checked, f"README.md:{line}: a multi-machine block without an lte-* command"


@pytest.mark.parametrize("line, body", by_kind("make"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_make_blocks_name_real_targets(line, body):
    for command in commands(body):
        words = shlex.split(command, comments=True)
        assert words[0] == "make", (f"README.md:{line}", command)
        result = subprocess.run(
            ["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, (f"README.md:{line}: {command}", result.stderr)


@pytest.mark.parametrize("line, body", by_kind("long"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_long_blocks_parse_and_name_real_commands(line, body):
    """Blocks too long to run here (a training run, a corpus): bash syntax, and each lte-* command
    exists and accepts its flags' names (its --help lists every flag the block uses)."""
    syntax = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, (f"README.md:{line}", syntax.stderr)
    for command in commands(body):
        words = [w for w in shlex.split(command, comments=True) if "=" not in w or w.startswith("-")]
        tool = next((w for w in words if w.startswith("lte-")), None)
        if tool is None:
            continue
        helptext = run_line(f"{tool} --help", ROOT, timeout=120)
        assert helptext.returncode == 0, (f"README.md:{line}: {tool}", helptext.stderr)
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in helptext.stdout, f"README.md:{line}: {tool} has no {flag}"
