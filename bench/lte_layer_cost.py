"""One LTE layer's training step, heads batched (``LTELinear.forward``) against head by head
(``LTELinear.reference_forward``, docs/design.md section 2 as written): time and matmul launches.

    python bench/lte_layer_cost.py --device cpu --heads 1,4 --rows 16,256
    python bench/lte_layer_cost.py --device cuda --precision bf16 --rows 64,12608

A vit-b MLP layer by default (768 -> 3072, int8 base, r 64, B', A' nonzero). ``rows`` is rows per
head (tokens x samples): few rows keep ``B'A'`` as a low-rank term, many fold it into the weight.
Time is the median of ``--repeat`` forward+backward passes; launches are the matrix-product
operators (mm, bmm, addmm, baddbmm, matmul's kernels) counted by ``torch.profiler`` over one pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.core.layers import LTELinear  # noqa: E402
from lte.common.job.precision import MixedPrecision  # noqa: E402

PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--in-features", type=int, default=768)
    p.add_argument("--out-features", type=int, default=3072)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--quant", default="int8", choices=("none", "int8", "nf4"))
    p.add_argument("--heads", default="1,4")
    p.add_argument("--rows", default="16,256", help="rows per head, comma-separated")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    mp = MixedPrecision(args.precision, device)
    n, m = args.in_features, args.out_features
    print(
        f"LTE layer {n} -> {m}, r {args.rank}, {args.quant} base, {args.precision}, on {device}: "
        "forward + backward, batched over heads vs head by head"
    )
    print(
        "| heads | rows per head | B'A' | batched ms | per-head ms | per-head / batched | batched products | per-head products |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for h in (int(x) for x in args.heads.split(",")):
        torch.manual_seed(0)
        layer = LTELinear(n, m, heads=h, rank=args.rank, alpha=4096.0, quant=args.quant, device=device)
        layer.set_base_weight(torch.randn(m, n, device=device) * 0.02)
        with torch.no_grad():
            layer.lora_A.normal_(0, 0.02)
            layer.lora_B.normal_(0, 0.02)
        layer.commit()  # B', A' nonzero, as after the first round
        for rows in (int(x) for x in args.rows.split(",")):
            x = torch.randn(h * rows, n, device=device)

            def step(fn, x=x) -> None:
                with mp.autocast():
                    y = fn(x)
                y.float().sum().backward()

            results = {}
            for name, fn in (("batched", layer.forward), ("per-head", layer.reference_forward)):
                step(fn)
                times = []
                for _ in range(args.repeat):
                    sync(device)
                    t = time.perf_counter()
                    step(fn)
                    sync(device)
                    times.append(time.perf_counter() - t)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step(fn)
                launches = sum(e.count for e in prof.key_averages() if e.key in PRODUCTS)
                results[name] = (statistics.median(times), launches)
            folded = rows * (m + n) >= m * n
            (tb, lb), (tp, lp) = results["batched"], results["per-head"]
            print(
                f"| {h} | {rows} | {'folded' if folded else 'low-rank'} | {tb * 1e3:.2f} | {tp * 1e3:.2f} "
                f"| {tp / tb:.2f} | {lb} | {lp} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
