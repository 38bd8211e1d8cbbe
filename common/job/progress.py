"""A one-line progress display on stderr: redrawn in place on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def format_bytes(n: float) -> str:
    """Bytes in binary units, as the dashboard writes them: ``512 B``, ``1.5 KiB``, ``25.8 MiB``, ``120 GiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    if i == 0:
        return f"{n:.0f} B"
    return f"{n:.0f} {units[i]}" if abs(n) >= 100 else f"{n:.1f} {units[i]}"


def format_count(n: float) -> str:
    """A count or rate with a k/M/G suffix, as the dashboard writes them: ``950``, ``1.2k``, ``12k``, ``3.1M``."""
    a = abs(n)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{n / scale:.0f}{suffix}" if a >= 10 * scale else f"{n / scale:.1f}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


def format_duration(seconds: float) -> str:
    """A duration as the dashboard writes it: ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key.startswith("bytes"):
            return f"{key} {format_bytes(value)}"
        if key.endswith("/s"):
            return f"{key} {format_count(value)}"
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
