"""Issue 25 item 3: Ctrl+C or SIGTERM while an evaluation runs stops ``lte-server`` in order, in
every zoo family, its output on a file or a terminal: exit 130 (README, "Stopping and resuming"),
a checkpoint, the resume line as the last line, and no native abort (the reported case: a vit-tiny
server writing to a file ended with ``terminate called without an active exception``, exit 134).

The server is the real one with its evaluations held open (``tests/held_evaluation.py``): the
signal goes out once an evaluation is inside a forward pass, so it surely arrives during one (the
vit family streams an image folder through a ``--loader-workers`` process, alive then). Ctrl+C
goes to the whole process group, as a terminal sends it (server, local worker, loader process);
SIGTERM to the server's pid, as ``kill PID`` does.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lte.common.data.text import ByteTokenizer, write_token_files
from tests.faults import group_gone, wait_until

pytestmark = pytest.mark.process

BOUND_S = 240  # each wait on a loaded 2-core machine
REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "--heads", "1", "--rank", "4", "--steps", "100000", "--merge-every", "2", "--batch-size", "8",
    "--local-workers", "1", "--port", "0", "--dashboard-port", "-1", "--checkpoint-every", "1",
    "--eval-every", "1", "--linger", "0",
]  # fmt: skip


def image_folder(root: Path) -> Path:
    """Two classes of 64x64 PNGs; 200 test images make 3 streamed evaluation batches (85 at most)."""
    from PIL import Image

    for split, count in (("train", 16), ("test", 100)):
        for label, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            (folder := root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (64, 64), tuple(min(255, c + i) for c in colour)).save(folder / f"{i}.png")
    return root


def text_folder(root: Path) -> Path:
    text = "In the beginning God created the heaven and the earth. And the earth was without form. " * 60
    write_token_files(root, [text], ByteTokenizer())
    return root


FAMILIES = {
    "mlp": lambda tmp: ["--model", "mlp", "--dataset", "digits"],
    "vit": lambda tmp: (
        ["--model", "vit-micro", "--dataset", "imagefolder", "--image-size", "64", "--loader-workers", "1"]
        + ["--data-dir", str(image_folder(tmp / "images"))]
    ),
    "gpt": lambda tmp: (
        ["--model", "gpt-micro", "--dataset", "text", "--context", "16"]
        + ["--data-dir", str(text_folder(tmp / "text"))]
    ),
}


class Output:
    """Where the server writes: a file, or a terminal (a pty this test reads as it fills)."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path, self.chunks = kind, path, []
        if kind == "file":
            self.file = open(path, "w")  # noqa: SIM115 (closed once the child holds it)
            self.child = self.file.fileno()
        else:
            import pty

            self.leader, self.child = pty.openpty()

    def started(self) -> None:
        if self.kind == "file":
            self.file.close()
        else:
            os.close(self.child)

    def text(self) -> str:
        if self.kind == "file":
            return self.path.read_text(errors="replace")
        while select.select([self.leader], [], [], 0)[0]:
            try:
                data = os.read(self.leader, 65536)
            except OSError:  # the pty closed: every writer has exited
                break
            if not data:
                break
            self.chunks.append(data)
        return b"".join(self.chunks).decode(errors="replace")

    def close(self) -> None:
        if self.kind == "pty":
            self.text()
            os.close(self.leader)


def stop_while_evaluating(tmp_path: Path, family: str, sig: signal.Signals, output: str):
    """Start the held server, signal it once an evaluation is in a forward pass; returns
    (exit code, its output, the marker's lines, the run folder)."""
    out, marker = tmp_path / "run", tmp_path / "evaluation.marker"
    command = [sys.executable, "-m", "tests.held_evaluation", str(marker), *FAMILIES[family](tmp_path)]
    command += [*COMMON, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    sink = Output(output, tmp_path / "server.log")
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL if output == "file" else sink.child, stdout=sink.child,
        stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    sink.started()
    try:
        wait_until(
            lambda: sink.text() is not None and (marker.exists() or proc.poll() is not None),  # drains a pty
            BOUND_S,
            "an evaluation in progress",
        )
        assert proc.poll() is None, sink.text()[-3000:]
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl+C: the terminal's foreground group
        else:
            proc.send_signal(sig)  # kill PID
        deadline = time.monotonic() + BOUND_S
        while proc.poll() is None and time.monotonic() < deadline:
            sink.text()  # a pty is read while it runs (a full one would block the server)
            time.sleep(0.05)
        code = proc.wait(timeout=5)
        wait_until(lambda: group_gone(proc.pid), 60, "the local worker and loader processes to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not group_gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test started (its own session)
        text = sink.text()
        sink.close()
    return code, text, marker.read_text().splitlines(), out


CASES = [(f, s, "file") for f in sorted(FAMILIES) for s in (signal.SIGINT, signal.SIGTERM)]
CASES.append(("vit", signal.SIGTERM, "pty"))  # tests/test_new_user.py has Ctrl+C on a terminal


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family, sig, output", CASES, ids=[f"{f}-{s.name}-{o}" for f, s, o in CASES])
def test_a_signal_during_an_evaluation_stops_in_order_without_a_native_abort(tmp_path, family, sig, output):
    code, text, marker, out = stop_while_evaluating(tmp_path, family, sig, output)
    tail = text[-3000:]
    assert "terminate called" not in text and "Traceback" not in text, tail
    assert code == 130, (code, tail)  # not 134 (SIGABRT) nor -6
    assert marker[:2] == ["evaluating", "released by the server's cancel"], (marker, tail)
    assert "evaluation thread alive at exit" not in marker, (marker, tail)
    lines = [line for line in re.split(r"[\r\n]+", text) if line.strip()]
    assert "continue with: " in lines[-1], tail  # the resume line is the last word
    match = re.search(r"checkpoint (\S+); continue with", lines[-1])
    assert match, lines[-1]
    checkpoint = tmp_path / match[1] if not Path(match[1]).is_absolute() else Path(match[1])
    assert (checkpoint / "state.json").is_file(), checkpoint
    for log in out.glob("worker-*.log"):
        assert "terminate called" not in log.read_text(), log.read_text()[-2000:]
