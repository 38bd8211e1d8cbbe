"""What the server does when its disk fails it: warn, keep training, retry, keep the last good copy.

A full disk or a read-only mount must never stop a job nor lose what was saved: a failed
checkpoint is logged as a warning, shown on the dashboard, and retried with backoff; the
checkpoint writer (server/checkpoint.py) only ever replaces a checkpoint by a complete newer
one; the final model goes to a fallback path, named on the log, when the run folder refuses it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

_log = logging.getLogger("lte.server")
# what a refused write raises: safetensors reports a full disk as its own error, not an OSError
WRITE_ERRORS = (OSError, SafetensorError)


class CheckpointHealth:
    """The outcome of the newest checkpoint attempts, and the retry of a failed one.

    ``retry``: called (from a timer thread) to ask for another save after a failure; the wait
    doubles from ``first_retry_s`` up to ``max_retry_s``. Thread-safe.
    """

    def __init__(
        self, retry: Callable[[], None], *, first_retry_s: float = 5.0, max_retry_s: float = 300.0
    ) -> None:
        self._retry = retry
        self.first_retry_s, self.max_retry_s = first_retry_s, max_retry_s
        self._lock = threading.Lock()
        self._next_wait = first_retry_s
        self._timer: threading.Timer | None = None
        self.last_good: Path | None = None
        self.warning: str | None = None  # shown on the dashboard while set
        self.failures = 0
        self.metrics_warned = False

    def saved(self, path: Path | None) -> None:
        with self._lock:
            recovered = self.warning is not None
            self.last_good = path or self.last_good
            self.warning, self._next_wait = None, self.first_retry_s
        if recovered:
            _log.warning("checkpoint saved again: %s", path)

    def failed(self, exc: BaseException) -> None:
        """A save raised ``exc``: warn, remember it for the dashboard, and retry later."""
        with self._lock:
            self.failures += 1
            wait = self._next_wait
            self._next_wait = min(self.max_retry_s, self._next_wait * 2)
            kept = f"the last good one is {self.last_good}" if self.last_good else "none saved yet"
            self.warning = (
                f"checkpoint failed ({_reason(exc)}); training goes on, {kept}; retrying in {wait:.0f} s"
            )
            if self._timer is None or not self._timer.is_alive():
                self._timer = threading.Timer(wait, self._retry)
                self._timer.daemon = True
                self._timer.start()
        _log.warning("%s", self.warning, extra={"checkpoint_error": _reason(exc)})

    def metrics_failed(self, exc: BaseException) -> None:
        """An append to metrics.jsonl failed: warn once (the records stay in memory and on the dashboard)."""
        with self._lock:
            first = not self.metrics_warned
            self.metrics_warned = True
        if first:
            _log.warning("cannot append to metrics.jsonl (%s); training goes on without it", _reason(exc))

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def fallback_model_path(out_dir: Path) -> Path:
    """Where the final model goes when the run folder refuses it: ``$LTE_FALLBACK_DIR`` or the temp folder."""
    folder = Path(os.environ.get("LTE_FALLBACK_DIR") or tempfile.gettempdir())
    return folder / f"lte-model-{out_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.safetensors"


def export_with_fallback(export: Callable[[Path], Path], out_dir: Path) -> Path:
    """Export to ``out_dir/model.safetensors``, else to :func:`fallback_model_path` (the log names it).

    Raises OSError when both fail (the message names both paths).
    """
    target = out_dir / "model.safetensors"
    try:
        return export(target)
    except WRITE_ERRORS as first:
        fallback = fallback_model_path(out_dir)
        _log.warning("cannot write %s (%s); exporting to %s instead", target, _reason(first), fallback)
        try:
            fallback.parent.mkdir(parents=True, exist_ok=True)
            return export(fallback)
        except WRITE_ERRORS as second:
            raise OSError(
                f"cannot export the model: {target} ({_reason(first)}), then {fallback} ({_reason(second)})"
            ) from second


def final_checkpoint(save: Callable[[], Path | None], export: Callable[[Path], Path], out_dir: Path) -> Any:
    """The checkpoint on SIGTERM / Ctrl+C. When the disk refuses it, the model still goes to a fallback.

    Returns the checkpoint's path, or None when it could not be written.
    """
    try:
        return save()
    except WRITE_ERRORS as exc:
        _log.warning("the checkpoint on exit failed (%s)", _reason(exc))
        try:
            path = export_with_fallback(export, out_dir)
            _log.warning("the merged weights are saved in %s (a model, not a checkpoint to resume)", path)
        except OSError as again:
            _log.warning("%s", again)
        return None
