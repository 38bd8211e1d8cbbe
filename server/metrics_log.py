"""The job's metrics records: one JSON object per line in ``metrics.jsonl`` (a version's merge, an
evaluation, a checkpoint, an update-guard event), also handed to each sink (TensorBoard)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lte.server.aggregation import Merged

Record = dict[str, Any]


class MetricsLog:
    """Appends records to ``path`` (none: sinks only), line-buffered. A write that fails (a full
    disk) goes to ``on_error(exc)`` and never stops a merge nor the job's end."""

    def __init__(self, path: str | Path | None, on_error: Callable[[OSError], None]) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._on_error = on_error
        self._sinks: list[Callable[[Record], None]] = []

    def add_sink(self, sink: Callable[[Record], None]) -> None:
        """Also hand every record to ``sink(record)``."""
        self._sinks.append(sink)

    def write(self, record: Record) -> None:
        if self._file:
            try:
                self._file.write(json.dumps(record) + "\n")
            except OSError as exc:
                self._on_error(exc)
        for sink in self._sinks:
            sink(record)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None


def version_record(version: int, time_s: float, merged: Merged, totals: Mapping[str, int]) -> Record:
    """A new version's line in metrics.jsonl: what the merge took in (``merged``) and the job's running
    ``totals`` (samples, head-rounds, bytes up and down) at ``time_s`` seconds of the job."""
    return {
        "version": version,
        "time": time_s,
        "samples": totals["samples"],
        "train_loss": merged.train_loss,
        "pushes": merged.pushes,
        "heads": merged.heads,
        "head_rounds": totals["head_rounds"],
        "lr": merged.lr_start,
        "bytes_up": totals["bytes_up"],
        "bytes_down": totals["bytes_down"],
    }
