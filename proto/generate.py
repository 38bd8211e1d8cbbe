"""Regenerate the committed gRPC/protobuf modules from ``lte/v1/parameter_server.proto``.

    python proto/generate.py           # rewrite proto/parameter_server_pb2*.py
    python proto/generate.py --check   # exit 1 if regeneration would change anything

The generated modules import each other as ``lte.v1``; they are installed as ``lte.proto``,
so that one import line is rewritten. Needs grpcio-tools (the dev extra).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = "lte/v1/parameter_server.proto"
OUTPUTS = ("parameter_server_pb2.py", "parameter_server_pb2.pyi", "parameter_server_pb2_grpc.py")


def generate() -> dict[str, str]:
    """Run protoc in a temporary folder and return {file name: text} of the modules."""
    from grpc_tools import protoc  # dev dependency only

    with tempfile.TemporaryDirectory() as out:
        args = [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(HERE / SOURCE),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {SOURCE}")
        gen = Path(out) / "lte" / "v1"
        return {
            name: (gen / name)
            .read_text()
            .replace("from lte.v1 import parameter_server_pb2", "from lte.proto import parameter_server_pb2")
            for name in OUTPUTS
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the committed modules differ")
    args = parser.parse_args()
    fresh = generate()
    if not args.check:
        for name, text in fresh.items():
            (HERE / name).write_text(text)
        print(f"wrote {', '.join(fresh)}")
        return 0
    stale = 0
    for name, text in fresh.items():
        path = HERE / name
        old = path.read_text() if path.exists() else ""
        if old != text:
            stale += 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True),
                    text.splitlines(True),
                    f"committed/{name}",
                    f"regenerated/{name}",
                    n=1,
                )
            )
    if stale:
        print(
            f"\n{stale} generated module(s) are stale: run `python proto/generate.py` and commit",
            file=sys.stderr,
        )
        return 1
    print("generated modules are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
