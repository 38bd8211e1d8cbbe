"""Writing a benchmark's own marked section of BENCHMARKS.md, leaving everything else alone."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Sequence
from pathlib import Path


def write_section(path: Path, section: str, lines: list[str]) -> None:
    """Replace ``<!-- section:start -->`` .. ``<!-- section:end -->`` of ``path`` (or append it).

    Hand-written notes between ``<!-- section:notes -->`` and ``<!-- /section:notes -->`` inside
    the old section are carried over, after the generated lines.
    """
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    notes_re = re.compile(rf"<!-- {section}:notes -->\n.*?<!-- /{section}:notes -->", re.DOTALL)
    text = path.read_text() if path.exists() else ""
    old = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL).search(text)
    notes = notes_re.search(old.group(0)) if old else None
    block = "\n".join([start, *lines, *([notes.group(0), ""] if notes else []), end])
    head, tail = (text[: old.start()], text[old.end() :]) if old else (text.rstrip("\n") + "\n\n", "\n")
    path.write_text(head + block + tail)


def write_model_blocks(
    path: Path, section: str, title: str, blocks: dict[str, list[str]], order: Sequence[str]
) -> None:
    """Replace these models' blocks (``<!-- section:model -->``) inside the marked section.

    Blocks of other models, and everything outside the section, are kept; a missing section is
    appended. Blocks are ordered as ``order``, unknown models last.
    """
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block_re = re.compile(rf"<!-- {section}:(\S+) -->\n(.*?)\n<!-- /{section}:\1 -->", re.DOTALL)
    text = path.read_text() if path.exists() else ""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + start + "\n" + end + "\n"
        i, j = text.find(start), text.find(end)
    found = dict(block_re.findall(text[i + len(start) : j]))
    found.update({m: "\n".join(lines) for m, lines in blocks.items()})
    ordered = sorted(found, key=lambda m: (order.index(m) if m in order else len(order), m))
    parts = [start, title, ""]
    for m in ordered:
        parts += [f"<!-- {section}:{m} -->", found[m], f"<!-- /{section}:{m} -->", ""]
    parts.append(end)
    path.write_text(text[:i] + "\n".join(parts) + text[j + len(end) :])


def machine() -> str:
    """The CPU model, core count and Python version, for a table's header."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
