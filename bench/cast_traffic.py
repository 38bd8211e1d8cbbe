"""Memory traffic an LTE layer adds under autocast: activation-sized copies and additions.

    python bench/cast_traffic.py                       # vit-b's fc1 (768 -> 3072), 1576 rows, bf16
    python bench/cast_traffic.py --rows 12608 --precision fp16

One forward and backward of an ``LTELinear`` (int8 base, r 64, frozen weight cached, as a CUDA
worker holds it) and of ``nn.Linear`` of the same shape, on an fp32 input (a LayerNorm's output
under autocast) that needs a gradient, the output summed in fp32. ``torch.profiler`` lists every
``aten::copy_`` (dtype casts, layout copies) and ``aten::add``/``add_`` whose first operand is an
activation (``rows`` rows: its dims before the last multiply to ``rows``) of at least ``rows x 256``
elements; the table gives their number and the elements they move, which are what a GPU spends
memory bandwidth on besides the GEMMs (BENCHMARKS: the H200 step profile). Weight-sized copies
(``nn.Linear``'s weight cast and its gradient's) are left out at any ``rows``.
The counts depend on the operators, not on the device, so the CPU measures them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.core.layers import LTELinear  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def activation_traffic(
    module: torch.nn.Module, rows: int, dtype: torch.dtype
) -> tuple[int, int, torch.dtype]:
    """(operators, elements moved, output dtype) of one forward+backward of ``module`` under autocast."""
    x = torch.randn(rows, module.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for _ in range(2):  # the second pass is measured: the frozen-weight cache is built by the first
        x.grad = None
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with torch.autocast("cpu", dtype=dtype):
                y = module(x)
            y.float().sum().backward()
    count = elements = 0
    for event in prof.events():
        if (
            event.name in ("aten::copy_", "aten::add", "aten::add_")
            and event.input_shapes
            and event.input_shapes[0]
            and math.prod(event.input_shapes[0][:-1]) == rows
        ):
            numel = math.prod(event.input_shapes[0])
            if numel >= rows * 256:
                count, elements = count + 1, elements + numel
    return count, elements, y.dtype


def lte_layer(n: int, m: int, rank: int, prev: bool) -> LTELinear:
    """One head over an int8 base, frozen weight cached; ``prev``: B', A' nonzero (after a merge)."""
    gen = torch.Generator().manual_seed(1)
    layer = LTELinear(n, m, heads=1, rank=rank, alpha=rank, quant="int8")
    layer.set_base_weight(torch.randn(m, n, generator=gen) * 0.02)
    if prev:
        with torch.no_grad():
            layer.lora_B_prev.copy_(torch.randn(layer.lora_B_prev.shape, generator=gen) * 0.01)
            layer.lora_A_prev.copy_(torch.randn(layer.lora_A_prev.shape, generator=gen) * 0.01)
        layer.has_prev = True
    layer.cache_frozen = True
    return layer.train()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-features", type=int, default=768)
    p.add_argument("--out-features", type=int, default=3072)
    p.add_argument("--rows", type=int, default=1576, help="rows of the input (tokens x samples) [1576]")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    args = p.parse_args()
    dtype = DTYPES[args.precision]
    n, m = args.in_features, args.out_features
    print(f"{n} -> {m}, {args.rows} rows, {args.precision} autocast, fp32 input; forward + backward")
    print("| layer | copies and adds | M elements moved | output dtype |")
    print("| --- | ---: | ---: | --- |")
    rows = [("nn.Linear", torch.nn.Linear(n, m))]
    rows += [
        (f"LTE, B'A' {'nonzero' if prev else 'zero'}", lte_layer(n, m, args.rank, prev))
        for prev in (False, True)
    ]
    for name, module in rows:
        count, elements, out = activation_traffic(module, args.rows, dtype)
        print(f"| {name} | {count} | {elements / 1e6:.2f} | {str(out).removeprefix('torch.')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
