"""Where a worker's step goes: the kernels of one full-training step against one LTE step.

    python bench/step_profile.py --device cuda --model vit-b --image-size 224 --patch-size 16 \\
        --batch-size 64 --precision bf16 --quant int8
    python bench/step_profile.py --device cpu --model vit-tiny --image-size 32 --patch-size 4 --batch-size 8

Both models are built as ``bench/worker_cost.py`` builds them (the LTE one as a worker holds it:
quantised base, frozen-weight cache on CUDA, one head). After ``--warmup`` steps, ``--steps`` steps
run under ``torch.profiler``; for each side the table gives the operators with the most device
time (self time, so nothing is counted twice), and one line the number of kernels launched per
step, their summed time and the step's wall time. The gap between wall time and kernel time is
what launches and the host cost; the operators that LTE adds are what its layer costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker_cost import add_model_arguments, build, example_batch, model_config  # noqa: E402

from lte.common.core.model_state import lte_layers  # noqa: E402
from lte.common.job.precision import MixedPrecision  # noqa: E402


def profile_side(cfg: dict, warmup: int, steps: int, rows: int) -> str:
    model, _, optimizer, job, device, _ = build(cfg)
    if cfg["mode"] == "lte":
        for layer in lte_layers(model).values():
            layer.cache_frozen = cfg["cache"]
    x, y = example_batch(cfg, job, device)
    mp = MixedPrecision(cfg["precision"], device)
    cuda = device.type == "cuda"

    def step() -> None:
        with mp.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        mp.step(loss, optimizer)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        launched = len(kernels) / steps
        kernel_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels)
        kernel_ms = kernel_us / 1e3 / steps
        summary = (
            f"{launched:.0f} kernels per step, {kernel_ms:.2f} ms of kernel time, {1e3 * wall:.2f} ms wall"
        )
    else:
        summary = f"{1e3 * wall:.2f} ms wall per step"
    name = (
        "full"
        if cfg["mode"] == "full"
        else f"LTE {cfg['quant']} base, cache {'on' if cfg['cache'] else 'off'}"
    )
    return f"### {name}, precision {cfg['precision']}: {summary}\n\n" + averages.table(
        sort_by=sort, row_limit=rows, max_name_column_width=60
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--quant", default="int8", choices=("int8", "nf4", "none"))
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument(
        "--cache", default="auto", choices=("auto", "on", "off"), help="frozen-weight cache [auto: on CUDA]"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=18, help="operators per table")
    args = p.parse_args()
    base = {**model_config(args, args.precision), "heads": 1}
    cache = {"on": True, "off": False}.get(args.cache, torch.device(args.device).type == "cuda")
    for cfg in (
        {**base, "mode": "full", "quant": "none"},
        {**base, "mode": "lte", "quant": args.quant, "cache": cache},
    ):
        print(profile_side(cfg, args.warmup, args.steps, args.rows), flush=True)
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
