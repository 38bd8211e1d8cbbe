"""The server's finite check of a push: one sum per tensor (``all_finite``) against ``isfinite().all()``.

    OMP_NUM_THREADS=1 python bench/finite_check.py
    python bench/finite_check.py --model vit-b --repeat 7

The tensors are one head's factors of the job's model (the shapes ``Coordinator.expected_tensors``
asks a push for), decoded as the service decodes them: fp16 on the wire, fp32 in memory. Both
checks run side by side in one process; the best of ``--repeat`` passes over the whole push.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.job.config import JobConfig  # noqa: E402
from lte.server.coordinator import Coordinator, all_finite  # noqa: E402


def best_ms(check, tensors: list[torch.Tensor], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for t in tensors:
            if not check(t):
                raise AssertionError("a finite tensor was called non-finite")
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    job = JobConfig(
        model=args.model, image_size=28, patch_size=4, in_channels=1, num_classes=10, rank=args.rank
    )
    shapes = Coordinator(job, None).expected_tensors([0])
    gen = torch.Generator().manual_seed(0)
    factors = [
        torch.randn(s, generator=gen).half().float() for n, s in shapes.items() if n.startswith("head/")
    ]
    values = sum(t.numel() for t in factors)
    exact = best_ms(lambda t: bool(torch.isfinite(t).all()), factors, args.repeat)
    fast = best_ms(all_finite, factors, args.repeat)
    print(
        f"{args.model} r {args.rank}: {len(factors)} factor tensors, {values / 1e6:.1f}M values, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"isfinite(t).all(): {exact:.1f} ms per push; all_finite (one sum): {fast:.1f} ms; {exact / fast:.1f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
