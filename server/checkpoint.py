"""Atomic, pickle-free checkpoints: a folder per version with ``tensors.safetensors`` and ``state.json``.

A checkpoint is written into a hidden temporary folder, every file and the folder fsynced, then
renamed into place (a rename is atomic on POSIX), and the parent fsynced. A process killed at any
point leaves either the previous newest checkpoint or the new one, never a half-written one
under a checkpoint name. Only the newest ``keep`` checkpoints are kept; the temporary folders
of killed writers are removed by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lte.common.job.models import VIT_PRESETS, default_patch_size

NAME = re.compile(r"^ckpt-(\d{10})$")
TEMP = re.compile(r"^\.tmp-ckpt-\d{10}-(\d+)$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_dead_writers_temps(directory: Path) -> None:
    """Temporary folders of writers that were killed mid-write: never a checkpoint, only disk."""
    for path in directory.iterdir():
        m = TEMP.match(path.name)
        if m and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    version: int,
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    keep: int = 3,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"ckpt-{version:010d}"
    tmp = directory / f".tmp-ckpt-{version:010d}-{os.getpid()}"
    _remove_dead_writers_temps(directory)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors")
        )
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
    except BaseException:  # a full disk, a read-only mount: free what was written, keep every checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same version saved again (e.g. on SIGTERM right after a periodic save):
        old = directory / f".old-ckpt-{version:010d}-{os.getpid()}"  # set aside until the new one is in
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(directory)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        p for p in directory.iterdir() if p.is_dir() and NAME.match(p.name) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint ``--resume path`` continues from: ``path`` itself, or the newest checkpoint of
    a run folder. FileNotFoundError when there is none."""
    path = Path(path)
    if not (path / "state.json").is_file():
        newest = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
        if newest is None:
            raise FileNotFoundError(f"no checkpoint in {path} (expected ckpt-<version>/state.json)")
        path = newest
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint folder, or a run folder holding checkpoints (the newest is taken)."""
    path = checkpoint_folder(path)
    state = json.loads((path / "state.json").read_text())
    return state, load_file(str(path / "tensors.safetensors"))


# Job fields added after checkpoints were first written, with the value an older server's job ran
# with: ``reset_optimizer`` (a checkpoint from before it trained with it off). Only fields whose
# default is that older behaviour belong here.
ABSENT_IN_OLDER_CHECKPOINTS: dict[str, Any] = {"reset_optimizer": False}


def job_difference(saved_job: Mapping[str, Any], job: Mapping[str, Any]) -> str | None:
    """None when a checkpoint's job (``state.json``'s ``job``) is ``job``; else the phrase naming the
    differing settings. Both compare resolved (a run's own config.toml holds warmup 300 for the -1
    a checkpoint kept); a job field added later is absent from an older checkpoint, whose job ran
    without it (``ABSENT_IN_OLDER_CHECKPOINTS``)."""
    saved = _effective({**ABSENT_IN_OLDER_CHECKPOINTS, **saved_job})
    now = _effective(job)
    diff = sorted(k for k, v in now.items() if k in saved and saved[k] != v)
    if not diff:
        return None
    return "the checkpoint belongs to another job; differing settings: " + ", ".join(
        f"{k} (checkpoint {saved[k]!r}, now {now[k]!r})" for k in diff
    )


def _effective(job: Mapping[str, Any]) -> dict[str, Any]:
    """Job settings with placeholders resolved, as lists where the TOML and JSON have lists.

    A checkpoint of an older server holds ``patch_size = 0`` and ``warmup_steps = -1`` where a run's
    config.toml (and a server now) holds the values they stand for: both sides compare resolved.
    """
    out: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in job.items()}
    if out.get("warmup_steps", -1) == -1 and "steps" in out:
        out["warmup_steps"] = max(1, int(out["steps"]) // 20)  # JobConfig.warmup's rule
    is_vit = str(out.get("model", "")).lower().replace("_", "-") in VIT_PRESETS
    if is_vit and not out.get("patch_size") and out.get("image_size"):
        out["patch_size"] = default_patch_size(int(out["image_size"]))  # the zoo's rule, as built
    return out
