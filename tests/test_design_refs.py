"""Every code reference to the design document points at a section that exists in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SOURCES = ("common", "commands", "server", "worker", "proto", "tests", "bench", "lte_pkg")
REFERENCE = re.compile(r"docs/design\.md sections? (\d+)(?: and (\d+))?")


def _source_files():
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".proto", ".sh") and "_pb2" not in path.name:
                yield path
    yield ROOT / "README.md"
    yield ROOT / "BENCHMARKS.md"


def test_every_reference_names_a_section_of_docs_design_md():
    sections = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.M))
    assert {"2", "3", "4", "5"} <= sections  # the ones the code cites today
    found, broken = 0, []
    for path in _source_files():
        for match in REFERENCE.finditer(path.read_text()):
            for number in filter(None, match.groups()):
                found += 1
                if number not in sections:
                    broken.append(f"{path.relative_to(ROOT)}: section {number}")
    assert found >= 10, "the references were not found: did the spelling change?"
    assert broken == []


def test_no_reference_to_a_design_file_outside_the_repository():
    stale = [
        str(path.relative_to(ROOT))
        for path in _source_files()
        if path != Path(__file__) and re.search(r"(?<!docs/design\.md)\bDESIGN(\.md)?\b", path.read_text())
    ]
    assert stale == []
