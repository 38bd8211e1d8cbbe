"""The package's imports run one way (bench/import_graph.py): no circle, nothing back up, no
private name taken from another module; and the script finds each of those where they are."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graph():
    if "import_graph" in sys.modules:
        return sys.modules["import_graph"]
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "bench" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_package_has_no_import_circle_no_upward_and_no_private_import():
    r = _import_graph().report(ROOT)
    assert r["modules"] > 40  # the layout was read (pyproject's package-dir)
    assert r["circles_with_function_level"] == []
    assert r["upward"] == []
    assert r["private"] == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"lte" = "lte_pkg"\n"lte.common" = "common"\n"lte.server" = "server"\n'
    )
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_script_reports_circles_upward_and_private_imports_of_each_kind(tmp_path):
    root = _tree(
        tmp_path,
        {
            "lte_pkg/__init__.py": "",
            "common/__init__.py": "",
            "common/a.py": "from lte.common.b import _helper\n",
            "common/b.py": "def _helper(): pass\ndef f():\n    from lte.common import a\n",
            "common/c.py": "from . import d\n",
            "common/d.py": "import lte.common.c as c\nx = c._hidden\n",
            "common/e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lte.server.s import S\n",
            "common/up.py": "def g():\n    from lte.server.s import S\n",
            "server/__init__.py": "",
            "server/s.py": "from lte import x\nclass S: pass\n",
        },
    )
    r = _import_graph().report(root)
    assert r["circles_module_level"] == [["lte.common.c", "lte.common.d"]]
    assert r["circles_with_function_level"] == [
        ["lte.common.a", "lte.common.b"],
        ["lte.common.c", "lte.common.d"],
    ]
    assert r["upward"] == [
        "lte.common.up:2 -> lte.server.s (function-level)",
        "lte.server.s:1 -> lte (module-level)",
    ]  # the type-only import of lte.common.e is not counted
    assert r["private"] == ["lte.common.a:1 lte.common.b._helper", "lte.common.d:2 lte.common.c._hidden"]
    assert (r["function_level_imports"], r["function_level_imports_lte"]) == (2, 2)
    assert _import_graph().main(["--root", str(root), "--check"]) == 1
    assert _import_graph().main(["--root", str(ROOT), "--check"]) == 0


def test_a_command_may_import_the_server_and_nothing_imports_a_command(tmp_path):
    root = _tree(
        tmp_path,
        {
            "lte_pkg/__init__.py": "",
            "common/__init__.py": "",
            "common/low.py": "def f():\n    from lte.commands import sim\n",
            "server/__init__.py": "",
            "server/agg.py": "from lte.common import low\n",
            "commands/__init__.py": "",
            "commands/sim.py": "from lte.server.agg import low\nfrom lte.common.low import f\n",
        },
    )
    (root / "pyproject.toml").write_text(
        (root / "pyproject.toml").read_text() + '"lte.commands" = "commands"\n'
    )
    r = _import_graph().report(root)
    assert r["upward"] == ["lte.common.low:2 -> lte.commands.sim (function-level)"]
    # the command -> server -> common -> command loop is one circle, found through the late import
    assert r["circles_with_function_level"] == [["lte.commands.sim", "lte.common.low", "lte.server.agg"]]
    assert r["circles_module_level"] == []


def test_common_sub_packages_import_only_those_below_them(tmp_path):
    root = _tree(
        tmp_path,
        {
            "lte_pkg/__init__.py": "",
            "common/__init__.py": "",
            "common/core/__init__.py": "",
            "common/core/layers.py": "from lte.common.job import config\n",
            "common/data/__init__.py": "",
            "common/data/datasets.py": "from lte.common.core.layers import x\n",
            "common/job/__init__.py": "",
            # spelt in two pieces: the relayout script rewrites the flat data module's dotted name
            "common/job/config.py": "from lte.common." + "data import datasets\n",
            "common/wire/__init__.py": "",
            "common/wire/protocol.py": "from lte.common.job.config import JobConfig\n",
        },
    )
    r = _import_graph().report(root)
    assert r["upward"] == ["lte.common.core.layers:1 -> lte.common.job.config (module-level)"]
