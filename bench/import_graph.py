"""The package's import graph, laid out as its imports say, and what is wrong with it.

The package's folders are mapped to the module names the code imports, from pyproject.toml's
``[tool.setuptools.package-dir]`` (``common/x.py`` is ``lte.common.x``, ``server/x.py`` is
``lte.server.x``, ``lte_pkg/__init__.py`` is ``lte``, and so on). Every ``import`` statement of
every module is read with :mod:`ast` (nothing is imported or run); relative imports are resolved,
and ``from lte.common import x`` counts as an import of ``lte.common.x`` when ``x`` is a module.

Each import is one of three kinds:

- **module-level**: runs when the module is imported (top of the file, or under ``if``/``try`` at
  module level);
- **function-level**: inside a ``def`` (runs when the function is called; hides the edge from the
  top of the file);
- **type-only**: under ``if TYPE_CHECKING:`` (never runs).

Reported:

1. **Import circles**: strongly connected components of more than one module (Tarjan), twice:
   over module-level edges only (a circle Python must resolve at import time), and over
   module-level plus function-level edges (a circle in the design, resolved only because one side
   imports late). Type-only edges are in neither.
2. **Imports running back up**: an edge (any kind but type-only) that breaks the layers:

   - ``lte.proto`` (generated wire modules) imports no other ``lte`` module;
   - ``lte.common`` (what both sides share: algorithm, wire, data, job) imports neither
     ``lte.server`` nor ``lte.worker``;
   - ``lte.server`` and ``lte.worker`` do not import each other: they talk only through
     ``lte.proto`` (a server starts local workers as processes, by command line);
   - ``lte.common``'s sub-packages by role (``COMMON_ORDER``): ``core`` (the model and the
     algorithm) < ``data`` < ``job`` < ``wire``; each imports only those below it;
   - ``lte.commands`` (``lte-sim``, ``lte-eval``, ...; ``COMMAND_MODULES`` names those still in
     ``common/``) may import any role; no role imports a command;
   - ``lte`` (``lte_pkg/__init__.py``) is the top: the package's face, run before any of its
     sub-packages; no sub-package imports it (``from lte import __version__`` runs back up), while
     it may import from below. A module that starts another as a process (``server/startup.py``'s
     ``WORKER_BOOT`` line) is a command line, not an import, and is not counted.

3. **Private imports**: a ``_name`` (one leading underscore, not a dunder) taken from another
   ``lte`` module, by ``from m import _name`` or by ``m._name`` on an imported module.
4. **Function-level imports**: how many ``import`` statements sit inside a function, of them how
   many import ``lte`` modules.

Usage::

    python bench/import_graph.py                 # this checkout
    python bench/import_graph.py --root /path/to/checkout --json
    python bench/import_graph.py --check         # exit 1 if any circle, upward or private import

Scope: the package only (``tests/`` and ``bench/`` are never imported by it).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MODULE, FUNCTION, TYPE_ONLY = "module", "function", "type-only"


@dataclass
class Edge:
    source: str  # importing module
    target: str  # imported lte module
    kind: str  # MODULE, FUNCTION or TYPE_ONLY
    line: int


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    private: list[tuple[str, int, str, str]] = field(default_factory=list)  # (module, line, from, name)
    function_imports: int = 0
    function_imports_lte: int = 0


def package_layout(root: Path) -> dict[str, Path]:
    """Module name -> file, from pyproject.toml's package-dir (every .py under each mapped folder)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    package_dir = config["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    # longest folder first, so a sub-folder mapped on its own is not walked twice
    for package, folder in sorted(package_dir.items(), key=lambda kv: -len(kv[1])):
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            if "_pb2" in path.name or any(p.startswith(".") for p in path.relative_to(base).parts):
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            modules.setdefault(name, path)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, kind: str):
    """Yield (import node, kind) and (attribute node, kind) under node, tracking the kind."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, FUNCTION if kind != TYPE_ONLY else kind)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    yield stmt, TYPE_ONLY
                else:
                    yield from _walk(stmt, TYPE_ONLY)
            for stmt in child.orelse:
                yield from _walk(stmt, kind)
        elif isinstance(child, (ast.Import, ast.ImportFrom, ast.Attribute)):
            yield child, kind
            yield from _walk(child, kind)
        else:
            yield from _walk(child, kind)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def build_graph(root: Path) -> Graph:
    graph = Graph(modules=package_layout(root))
    names = graph.modules
    for module, path in names.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> lte module, for m._name
        for node, kind in _walk(tree, MODULE):
            if isinstance(node, ast.Attribute):
                if (
                    isinstance(node.value, ast.Name)
                    and node.value.id in aliases
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                ):
                    graph.private.append((module, node.lineno, aliases[node.value.id], node.attr))
                continue
            targets: list[tuple[str, str | None]] = []  # (module, private name or None)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in names or alias.name.split(".")[0] == "lte":
                        targets.append((alias.name, None))
                        aliases[alias.asname or alias.name] = alias.name
            else:
                source = _resolve(module, is_package, node)
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in names:
                        targets.append((submodule, None))
                        aliases[alias.asname or alias.name] = submodule
                    elif source in names:
                        private = alias.name.startswith("_") and not alias.name.startswith("__")
                        targets.append((source, alias.name if private else None))
            if kind == FUNCTION:
                graph.function_imports += 1
                graph.function_imports_lte += bool(targets)
            for target, private in targets:
                while target not in names and "." in target:  # lte.common.x.y -> lte.common.x
                    target = target.rsplit(".", 1)[0]
                if target in names and target != module:
                    graph.edges.append(Edge(module, target, kind, node.lineno))
                    if private is not None:
                        graph.private.append((module, node.lineno, target, private))
    return graph


def strongly_connected(nodes: list[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node, each sorted."""
    out: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        out[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~70)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in out[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return sorted(components)


# Commands still in common/ (none since the relayout: they are lte.commands.*)
COMMAND_MODULES: frozenset[str] = frozenset()


def layer(module: str) -> str:
    if module in COMMAND_MODULES:
        return "commands"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lte"


# layer -> the layers it must not import. ``commands`` (lte-sim, lte-eval, ...) are thin programs
# over the roles: they may import common, server and worker; nothing below imports a command.
FORBIDDEN = {
    "proto": {"lte", "common", "server", "worker", "commands"},
    "common": {"lte", "server", "worker", "commands"},
    "server": {"lte", "worker", "commands"},
    "worker": {"lte", "server", "commands"},
    "commands": {"lte"},
    "lte": set(),
}


# common/'s sub-packages by role (issue 20), bottom first: each may import those before it only
COMMON_ORDER = ("core", "data", "job", "wire")


def _common_rank(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) > 3 and parts[1] == "common" and parts[2] in COMMON_ORDER:
        return COMMON_ORDER.index(parts[2])
    return None


def runs_up(source: str, target: str) -> bool:
    """Whether an import from ``source`` of ``target`` breaks the layers (``FORBIDDEN``, and
    ``COMMON_ORDER`` between common's sub-packages)."""
    if layer(target) in FORBIDDEN.get(layer(source), set()):
        return True
    low, high = _common_rank(source), _common_rank(target)
    return low is not None and high is not None and high > low


def report(root: Path) -> dict:
    graph = build_graph(root)
    nodes = list(graph.modules)
    runtime = [e for e in graph.edges if e.kind != TYPE_ONLY]
    module_edges = {(e.source, e.target) for e in runtime if e.kind == MODULE}
    all_edges = {(e.source, e.target) for e in runtime}
    upward = [e for e in runtime if runs_up(e.source, e.target)]
    return {
        "root": str(root),
        "modules": len(nodes),
        "edges": {
            "module": len(module_edges),
            "function": len({(e.source, e.target) for e in runtime if e.kind == FUNCTION}),
            "type_only": len({(e.source, e.target) for e in graph.edges if e.kind == TYPE_ONLY}),
        },
        "circles_module_level": strongly_connected(nodes, module_edges),
        "circles_with_function_level": strongly_connected(nodes, all_edges),
        "upward": [f"{e.source}:{e.line} -> {e.target} ({e.kind}-level)" for e in upward],
        "upward_edges": len({(e.source, e.target) for e in upward}),
        "private": [f"{m}:{line} {src}.{name}" for m, line, src, name in graph.private],
        "function_level_imports": graph.function_imports,
        "function_level_imports_lte": graph.function_imports_lte,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if there is any circle, upward or private import"
    )
    args = parser.parse_args(argv)
    if not (args.root / "pyproject.toml").is_file():
        print(f"import_graph: no pyproject.toml under --root {args.root}", file=sys.stderr)
        return 2
    r = report(args.root)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"root: {r['root']}")
        print(
            f"modules: {r['modules']}, import edges (module / function / type-only): "
            f"{r['edges']['module']} / {r['edges']['function']} / {r['edges']['type_only']}"
        )
        for key, label in (
            ("circles_module_level", "import circles, module-level imports only"),
            ("circles_with_function_level", "import circles, module- and function-level imports"),
        ):
            print(f"{label}: {len(r[key])}")
            for component in r[key]:
                print("  " + " <-> ".join(component))
        print(f"imports running back up: {len(r['upward'])} statements, {r['upward_edges']} module edges")
        for line in r["upward"]:
            print("  " + line)
        print(f"private names imported from another module: {len(r['private'])}")
        for line in r["private"]:
            print("  " + line)
        print(
            f"function-level imports: {r['function_level_imports']} "
            f"({r['function_level_imports_lte']} of them lte.*)"
        )
    bad = r["circles_with_function_level"] or r["upward"] or r["private"]
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
