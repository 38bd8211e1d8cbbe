"""A one-line progress display on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key.startswith("bytes"):
            return f"{key} {format_bytes(value)}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class Progress:
    def __init__(
        self,
        total: int | None,
        label: str,
        stream: TextIO | None = None,
        every_s: float = 5.0,
        unit: str = "head-rounds",
    ) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._start = time.perf_counter()
        self._width = 0

    def update(self, done: int, **fields: Any) -> None:
        now = time.perf_counter()
        final = self.total is not None and done >= self.total
        if not self.tty and not final and now - self._last < self.every_s:
            return
        self._last = now
        head = (
            f"{self.label} [{done}/{self.total} {self.unit}]"
            if self.total
            else f"{self.label} [{done} {self.unit}]"
        )
        line = "  ".join([head, *(_fmt(k, v) for k, v in fields.items()), f"{now - self._start:.0f}s"])
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
