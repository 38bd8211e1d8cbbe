"""A run folder belongs to one job (issue 24, item 2): a lock file with the owner's pid and host.

``lte-server`` takes ``<run folder>/.lte-lock`` before it writes anything there and removes it when it
exits. A second server on the same folder is refused in one line naming the owner; a lock left by a
process that is gone (same host, pid not alive) is taken over with a warning. A lock of another
host cannot be checked from here: it is refused, and the message says which file to remove if
that server is gone. The file is created with ``O_CREAT | O_EXCL``, so two servers starting in the
same instant cannot both take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

from lte.common.job.checks import ConfigError
from lte.server.checkpoint import list_checkpoints

LOCK_NAME = ".lte-lock"
EXPORT_NAME = "model.safetensors"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (signal 0; a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run folder, held by this process until ``release``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        """Take the lock; ``ConfigError`` (one line, naming ``--out`` and the owner) when another live
        process holds it. A stale lock of a dead process on this host is taken over with a warning."""
        for _ in range(3):  # a stale lock removed between our read and our create: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # removed meanwhile, or half-written by a starting server: read again
                pid, host = owner.get("pid", -1), owner.get("host", "")
                # our own pid in the lock: a previous run of a container restarted with pid 1 again
                if host == socket.gethostname() and (not pid_alive(int(pid)) or int(pid) == os.getpid()):
                    print(
                        f"lte-server: warning: {self.path} was left by process {pid} on {host}, which is "
                        "gone; taking the run folder over",
                        file=sys.stderr,
                    )
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                where = (
                    "" if host == socket.gethostname() else f" (remove {self.path} if that server is gone)"
                )
                raise ConfigError(
                    f"--out {self.folder}: the run folder is in use by lte-server pid {pid} on host {host}"
                    f"{where}; pick another --out"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
            self.held = True
            return self
        raise ConfigError(f"--out {self.folder}: could not take the run folder's lock {self.path}")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # a lock another server is still writing (it takes microseconds), or garbage
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            if age < 2.0:
                time.sleep(0.05)
                return None
            return {"pid": -1, "host": socket.gethostname()}  # unreadable and old: stale
        return owner if isinstance(owner, dict) else {"pid": -1, "host": socket.gethostname()}

    def release(self) -> None:
        """Remove the lock if this process still holds it (not one another server took over)."""
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if (
            owner is not None
            and owner.get("pid") == os.getpid()
            and owner.get("host") == socket.gethostname()
        ):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def check_reused_out(folder: Path, *, overwrite: bool, resume: bool) -> None:
    """A run folder that holds an earlier job's export or checkpoints is not silently reused:
    ``ConfigError`` unless ``--overwrite`` (replace them: the old checkpoints are removed, or the
    new job's first checkpoints, of lower versions, would be pruned at once beside them and
    ``--resume`` would later pick the old job's) or ``--resume`` (continue that job)."""
    if resume:
        return
    old = list_checkpoints(folder / "checkpoints")
    if overwrite:
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return
    if (folder / EXPORT_NAME).exists():
        raise ConfigError(
            f"--out {folder}: the folder holds the model of an earlier job ({EXPORT_NAME}); pick another "
            "--out, or add --overwrite to replace it (or --resume to continue that job)"
        )
    if old:
        raise ConfigError(
            f"--out {folder}: the folder holds checkpoints of an earlier job (newest {old[-1].name}); "
            f"add {shlex.join(['--resume', str(Path(folder).absolute())])} to continue that job, --overwrite to replace it, "
            "or pick another --out"
        )
