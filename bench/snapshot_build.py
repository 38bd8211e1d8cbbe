"""What a new version's snapshot costs the server: quantise + zstd of the master, per zstd level.

    python bench/snapshot_build.py                      # vit-b at 28x28 / patch 4, int8 and nf4
    python bench/snapshot_build.py --levels 1 3 --repeat 3

Every version a worker pulls is encoded once (``Coordinator.snapshot_messages``): in async mode
that is once per push. The master is taken twice: as initialised (truncated normal), and with
every Linear weight redrawn from a Student-t with 3 degrees of freedom (std 0.02 scale), whose
heavy tails are closer to trained weights and leave the per-row int8 codes more compressible.
Reported side by side in one run: payload bytes, the ratio to the uncompressed codes, and the
build time (median of ``--repeat``) for each zstd level.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.config import JobConfig  # noqa: E402
from lte.server import coordinator as coord  # noqa: E402


def build_seconds(c: coord.Coordinator, level: int, repeat: int) -> tuple[float, int]:
    coord.SNAPSHOT_ZSTD_LEVEL = level
    times = []
    for _ in range(repeat):
        c._snapshot = None  # the next pull of a new version
        started = time.perf_counter()
        _, _, payload = c.snapshot_messages()
        times.append(time.perf_counter() - started)
    return statistics.median(times), payload


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b")
    p.add_argument("--quants", nargs="+", default=["int8", "nf4"])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    default_level = coord.SNAPSHOT_ZSTD_LEVEL
    print(f"{args.model} at 28x28 / patch 4, torch threads {torch.get_num_threads()}")
    print("| snapshot | weights | zstd level | payload MB | ÷ uncompressed | build s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for quant in args.quants:
        job = JobConfig(
            model=args.model, image_size=28, patch_size=4, in_channels=1, num_classes=10, quant=quant
        )
        c = coord.Coordinator(job, None)
        for weights in ("init", "student-t(3)"):
            if weights != "init":
                gen = torch.distributions.StudentT(3.0)
                with torch.no_grad():
                    for name in c.layer_names:
                        c.master[name].copy_(gen.sample(c.master[name].shape) * 0.02)
            c._snapshot = None
            coord.SNAPSHOT_ZSTD_LEVEL = None  # encode_tensor: no zstd
            _, _, raw = c.snapshot_messages()
            for level in args.levels:
                seconds, payload = build_seconds(c, level, args.repeat)
                print(
                    f"| {quant} | {weights} | {level} | {payload / 1e6:.1f} | {payload / raw:.3f} | {seconds:.2f} |"
                )
    coord.SNAPSHOT_ZSTD_LEVEL = default_level
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
