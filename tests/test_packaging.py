"""The wheel carries what the package needs and builds without warnings; static tools can follow lte.*."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lte.common

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.process
def test_the_wheel_builds_without_warnings_and_carries_the_proto_and_the_dashboard(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    log = build.stdout + build.stderr
    assert "BuildBackendWarning" not in log and "is absent from the `packages`" not in log, log[-3000:]
    (wheel,) = tmp_path.glob("lte-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "lte/proto/lte/v1/parameter_server.proto" in names
    assert {"lte/server/static/index.html", "lte/server/static/dashboard.js", "lte/py.typed"} <= names
    assert {"lte/common/job/checks.py", "lte/commands/eval.py", "lte/server/disk.py"} <= names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata


def test_the_development_install_lays_out_lte_as_files_static_tools_can_read():
    # strict editable mode: lte/common/... exists on disk (links), not only through an import hook
    path = Path(lte.common.__file__)
    assert path.parent.name == "common" and path.parent.parent.name == "lte", path
    assert path.resolve() == ROOT / "common" / "__init__.py"


def test_the_package_version_is_the_one_pyproject_declares():
    """``lte.__version__`` (kept in ``lte.common.job.version`` so no sub-package imports ``lte``) is the
    version the wheel is built with."""
    import lte
    from lte.common.job.checks import read_toml

    declared = read_toml(ROOT / "pyproject.toml")["project"]["version"]
    assert lte.__version__ == declared
