"""Lines and methods of the package's largest classes (issue 20's acceptance: no class over 400 lines).

    python bench/class_sizes.py            # the 8 largest classes, and how many are over the limit
    python bench/class_sizes.py --limit 400 --top 20

Reads the source with ``ast`` (a class's lines: its ``class`` line to its last statement, docstring
and comments inside included); generated protobuf modules are left out.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("common", "commands", "server", "worker", "proto", "lte_pkg")


def class_sizes(root: Path = ROOT) -> list[tuple[int, int, str]]:
    """(lines, methods, ``path:Class``) of every class in the package, largest first."""
    rows = []
    for folder in PACKAGE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    methods = sum(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) for b in node.body)
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    rows.append((lines, methods, f"{path.relative_to(root)}:{node.name}"))
    return sorted(rows, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=400, help="lines a class may have [400]")
    parser.add_argument("--top", type=int, default=8, help="classes to list [8]")
    args = parser.parse_args()
    rows = class_sizes()
    for lines, methods, name in rows[: args.top]:
        print(f"{lines:5d} lines {methods:3d} methods  {name}")
    over = [r for r in rows if r[0] > args.limit]
    print(f"{len(over)} of {len(rows)} classes over {args.limit} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
