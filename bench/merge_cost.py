"""Server merge cost per push against a plain GEMM of the same shapes, on one device.

    python bench/merge_cost.py --model vit-b --rank 64 --heads-per-push 1 --device cpu

A push of k heads folds ``W += (s/N) sum_i (B_i A_i - B'_i A'_i)`` into every LTE layer: one
``[m, 2rk] x [2rk, n]`` product per layer, added in place. Two merges are timed: per layer
(``merge_head_deltas``, two or more launches per layer) and grouped over layers of one shape
(``merge_layers_grouped``): ``bmm``, one batched GEMM and one multi-tensor add per shape, and
``addmm``, factors stacked per shape then one in-place GEMM per layer. The baseline
is ``torch.mm`` of exactly those shapes into a preallocated output, on the same device, in the
same run, so the ratio isolates what the merge adds (scaling, concatenation, the in-place add).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.core.merge import merge_head_deltas, merge_layers_grouped  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.trainer import build_job_model, linear_weight_names  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--heads-per-push", default="1,4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="master weights")
    p.add_argument("--json-out", help="also write the rows as JSON here")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    job = JobConfig(
        model=args.model, image_size=args.image_size, in_channels=3, num_classes=1000, rank=args.rank
    )
    with torch.device("meta"):
        plain = build_job_model(job)
    shapes = [tuple(dict(plain.named_parameters())[n].shape) for n in linear_weight_names(plain)]
    weights = [torch.randn(m, n, device=device, dtype=dtype) for m, n in shapes]
    r = args.rank
    label = f"{args.model}, r {r}, {len(shapes)} layers, {sum(m * n for m, n in shapes) / 1e6:.1f}M merged weights"
    print(
        f"merge per push vs plain GEMM on {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f": {label}, {args.dtype}"
    )
    print(
        "| heads per push | plain GEMM ms | GEMM GFLOP/s | per-layer merge ms | grouped bmm ms "
        "| grouped addmm ms | merge / GEMM throughput: per-layer | grouped bmm | grouped addmm |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for k in (int(x) for x in args.heads_per_push.split(",")):
        factors = [
            [
                (
                    torch.randn(m, r, device=device, dtype=dtype),
                    torch.randn(r, n, device=device, dtype=dtype),
                    torch.randn(m, r, device=device, dtype=dtype),
                    torch.randn(r, n, device=device, dtype=dtype),
                )
                for _ in range(k)
            ]
            for m, n in shapes
        ]
        lefts = [torch.randn(m, 2 * r * k, device=device, dtype=dtype) for m, _ in shapes]
        rights = [torch.randn(2 * r * k, n, device=device, dtype=dtype) for _, n in shapes]
        outs = [torch.empty(m, n, device=device, dtype=dtype) for m, n in shapes]

        def merge(factors=factors, k=k) -> None:
            for w, f in zip(weights, factors, strict=True):
                merge_head_deltas(w, f, [1e-3] * k)

        def grouped_bmm(factors=factors, k=k) -> None:
            merge_layers_grouped(weights, factors, [[1e-3] * k] * len(weights), add="bmm")

        def grouped_addmm(factors=factors, k=k) -> None:
            merge_layers_grouped(weights, factors, [[1e-3] * k] * len(weights), add="addmm")

        def gemm(lefts=lefts, rights=rights, outs=outs) -> None:
            for a, b, o in zip(lefts, rights, outs, strict=True):
                torch.mm(a, b, out=o)

        flops = sum(2 * m * n * 2 * r * k for m, n in shapes)
        t = {name: timed(fn, device, args.repeat) for name, fn in
             (("gemm", gemm), ("per_layer", merge), ("grouped_bmm", grouped_bmm), ("grouped_addmm", grouped_addmm))}  # fmt: skip
        rows.append({"heads_per_push": k, **{f"{name}_s": v for name, v in t.items()}, "flops": flops})
        merges = ("per_layer", "grouped_bmm", "grouped_addmm")
        print(
            f"| {k} | {t['gemm'] * 1e3:.1f} | {flops / t['gemm'] / 1e9:.0f} | "
            + " | ".join(f"{t[m] * 1e3:.1f}" for m in merges)
            + " | "
            + " | ".join(f"{t['gemm'] / t[m]:.2f}" for m in merges)
            + " |"
        )
    if args.json_out:
        meta = {"model": args.model, "rank": r, "device": str(device), "dtype": args.dtype}
        if device.type == "cuda":
            meta["card"] = torch.cuda.get_device_name(device)
        Path(args.json_out).write_text(json.dumps([{**meta, **row} for row in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
