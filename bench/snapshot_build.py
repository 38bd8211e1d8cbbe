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

from lte.common.job.config import JobConfig  # noqa: E402
from lte.server import coordinator as coord  # noqa: E402


def build_seconds(c: coord.Coordinator, level: int, repeat: int) -> tuple[float, int]:
    coord.SNAPSHOT_ZSTD_LEVEL = level
    times = []
    for _ in range(repeat):
        c.snapshots.invalidate()  # the next pull of a new version
        started = time.perf_counter()
        _, _, payload = c.snapshot_messages()
        times.append(time.perf_counter() - started)
    return statistics.median(times), payload


def pull_storm(quant: str, pullers: int, duration: float, version_every: float, single_flight: bool) -> dict:
    """Async-mode pulls under load: a thread makes a new version every ``version_every`` s (as
    pushes do), ``pullers`` threads each pull the newest snapshot, then 'train' 0.5-1.5 s."""
    import random
    import threading

    job = JobConfig(model="vit-b", image_size=28, patch_size=4, in_channels=1, num_classes=10, quant=quant)
    c = coord.Coordinator(job, None, device="cpu")
    if not single_flight:  # the earlier rule: the cache serves only the exact current version
        original, gate = c.snapshot_messages, threading.Lock()

        def exact() -> tuple:
            with gate:  # builds were serialised, and each checked the version when its turn came
                with c.lock:
                    built = c.snapshots._snapshot
                    if built is not None and built[0] == c.version:
                        return built
                    c.snapshots.invalidate()
                return original()

        c.snapshot_messages = exact
    stop = threading.Event()
    waits: list[float] = []

    def versions() -> None:
        while not stop.wait(version_every):
            with c.lock:
                c.version += 1

    def puller(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            started = time.perf_counter()
            c.snapshot_messages()
            waits.append(time.perf_counter() - started)
            stop.wait(rng.uniform(0.5, 1.5))

    threads = [threading.Thread(target=versions)] + [
        threading.Thread(target=puller, args=(i,)) for i in range(pullers)
    ]
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join()
    return {
        "builds": c.snapshots.builds,
        "versions": c.version,
        "pulls": len(waits),
        "wait_p50": statistics.median(waits),
        "wait_max": max(waits),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b")
    p.add_argument("--quants", nargs="+", default=["int8", "nf4"])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--storm", action="store_true", help="also time concurrent pulls while versions advance")
    p.add_argument("--pullers", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--version-every", type=float, default=0.2, help="seconds between versions in --storm")
    args = p.parse_args()
    if args.storm:
        print(
            f"pull storm: {args.pullers} pullers, a new version every {args.version_every} s, {args.duration} s"
        )
        print(
            "| snapshot | builds served | builds | versions | pulls | builds / pull | pull wait p50 s | max s |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for quant in args.quants:
            for single_flight in (False, True):
                r = pull_storm(quant, args.pullers, args.duration, args.version_every, single_flight)
                rule = "single-flight (now)" if single_flight else "exact version (before)"
                print(
                    f"| {quant} | {rule} | {r['builds']} | {r['versions']} | {r['pulls']} | "
                    f"{r['builds'] / max(1, r['pulls']):.2f} | {r['wait_p50']:.2f} | {r['wait_max']:.2f} |"
                )
        return 0
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
            c.snapshots.invalidate()
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
