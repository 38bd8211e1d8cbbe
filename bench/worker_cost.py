"""Worker memory and step time: an LTE worker (int8 / nf4 / fp32 base) against full AdamW training.

    python bench/worker_cost.py --model vit-b --image-size 28 --patch-size 4 --batch-size 8   # CPU
    python bench/worker_cost.py --model vit-b --device cuda --image-size 224 --batch-size 64 --precision bf16

Both sides train in ``--precision`` (autocast as ``lte-worker`` does, fp16 loss-scaled; parameters
and AdamW state in fp32). The frozen-weight cache follows the worker's default (on for CUDA)
unless ``--frozen-cache`` says otherwise; ``--compare-cache`` adds the first quant the other way.

Each configuration runs in a fresh subprocess, so the process peak (RSS on CPU, the high-water
mark of ``torch.cuda.max_memory_allocated`` on GPU) belongs to it alone. Model state is counted
exactly: weights and buffers, gradients after a backward, optimiser state after a step.
Step time is the median of ``--steps`` timed steps after ``--warmup``, same model, same batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.core.model_state import lte_layers, trainable_parameters  # noqa: E402
from lte.common.core.policy import (  # noqa: E402
    load_master_weights,
    prepare_model,
    prepare_model_on_device,
)
from lte.common.core.quant import quantized_zeros  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.precision import MixedPrecision  # noqa: E402
from lte.common.job.trainer import build_job_model, make_optimizer  # noqa: E402


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def snapshot_like(shapes: dict, layers: set[str], quant: str, device) -> dict:
    """A snapshot as a worker decodes it: layer weights arrive as codes and scales (no float copy),
    everything else as float32; random values, made one tensor at a time."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in shapes.items():
        if name in layers and quant != "none":
            q = quantized_zeros(quant, shape)
            q.codes.copy_(
                torch.randint(0, 256, q.codes.shape, generator=gen, dtype=torch.uint8).view(q.codes.dtype)
            )
            q.scale.uniform_(0.01, 0.03, generator=gen)
            out[name] = q.to(device)
        else:
            out[name] = (torch.randn(shape, generator=gen) * 0.02).to(device)
    return out


def build(cfg: dict):
    """The model of one configuration as a worker (LTE) or plain training (full) holds it on the
    device: (model, trainable parameters, optimizer, job, device, build peak bytes)."""
    device = torch.device(cfg["device"])
    job = JobConfig(
        model=cfg["model"],
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_channels=3,
        num_classes=1000 if cfg["image_size"] >= 64 else 10,
        heads=cfg["heads"],
        rank=cfg["rank"],
        alpha=cfg["alpha"],
        quant=cfg["quant"] if cfg["mode"] == "lte" else "none",
        batch_size=cfg["batch_size"],
    )
    if cfg["mode"] == "lte":
        # as a real worker builds it: no fp32 model (meta device), B', A' in the uplink's dtype
        # (fp16 by default), then the base loaded from a snapshot decoded one tensor at a time;
        # "eager" is the earlier build: the fp32 zoo model first, then converted
        lte = job.lte_config(list(range(cfg["heads"])), wire_rounded=True)
        if cfg.get("eager"):
            plain = build_job_model(job)
            shapes = {name: t.shape for name, t in plain.state_dict().items()}
            model = prepare_model(plain, lte).to(device)
        else:
            with torch.device("meta"):
                plain = build_job_model(job)
            shapes = {name: t.shape for name, t in plain.state_dict().items()}
            model = prepare_model_on_device(plain, lte, device)
        del plain
        load_master_weights(model, snapshot_like(shapes, set(lte_layers(model)), job.quant, device))
        for layer in lte_layers(model).values():
            layer.cache_frozen = cfg["cache"]
    else:
        model = build_job_model(job).to(device)
    build_peak = peak_bytes(device)
    model.train()
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, job)
    return model, params, optimizer, job, device, build_peak


def example_batch(cfg: dict, job: JobConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels of one step: batch-size per head, times the heads for LTE."""
    gen = torch.Generator().manual_seed(0)
    batch = cfg["batch_size"] * (cfg["heads"] if cfg["mode"] == "lte" else 1)
    x = torch.randn(batch, 3, job.image_size, job.image_size, generator=gen).to(device)
    y = torch.randint(0, job.num_classes, (batch,), generator=gen).to(device)
    return x, y


def measure(cfg: dict) -> dict:
    model, params, optimizer, job, device, build_peak = build(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x, y = example_batch(cfg, job, device)
    batch = x.shape[0]
    times = []
    mp = MixedPrecision(cfg["precision"], device)
    for step in range(cfg["warmup"] + cfg["steps"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with mp.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        mp.step(loss, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - t)
    cached = (
        sum(layer.frozen_cache_nbytes for layer in lte_layers(model).values()) if cfg["mode"] == "lte" else 0
    )
    state = {
        "weights_and_buffers": tensor_bytes(list(model.parameters()) + list(model.buffers())) + cached,
        "grads": tensor_bytes(p.grad for p in params),
        "optimizer": tensor_bytes(
            v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }
    out = {
        **cfg,
        "model_state_bytes": sum(state.values()),
        **state,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "samples_per_step": batch,
    }
    out["peak_bytes"], out["build_peak_bytes"] = peak_bytes(device), build_peak
    if device.type == "cuda":
        out["card"] = torch.cuda.get_device_name(device)
    return out


def peak_bytes(device: torch.device) -> int:
    """The process's high-water mark so far: RSS on CPU, allocated memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model and its size, shared with ``bench/step_profile.py``."""
    p.add_argument("--model", default="vit-b")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="samples per head (and per full-training step)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=4096)


def model_config(args: argparse.Namespace, precision: str) -> dict:
    """The configuration keys that ``build`` reads, from ``add_model_arguments``'s flags."""
    names = ("model", "device", "image_size", "patch_size", "batch_size", "rank", "alpha")
    return {**{name: getattr(args, name) for name in names}, "precision": precision}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--heads", type=int, default=1, help="LTE heads on the worker")
    p.add_argument("--quants", default="int8,nf4,none")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast of every run [fp32]"
    )
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)  # earlier name of --precision bf16
    p.add_argument(
        "--frozen-cache",
        default="auto",
        choices=("auto", "on", "off"),
        help="LTE runs keep each layer's frozen weight for the round; auto: on for CUDA [auto]",
    )
    p.add_argument(
        "--eager-build",
        action="store_true",
        help="add the first quant built the earlier way (fp32 zoo model first) for comparison",
    )
    p.add_argument(
        "--compare-cache",
        action="store_true",
        help="add the first quant with the frozen-weight cache the other way (the cache counts as state)",
    )
    p.add_argument("--json-out", help="also write the rows as JSON here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    base = {
        **model_config(args, "bf16" if args.amp else args.precision),
        "warmup": args.warmup,
        "steps": args.steps,
    }
    cache = {"on": True, "off": False}.get(args.frozen_cache, torch.device(args.device).type == "cuda")
    configs = [{**base, "mode": "full", "quant": "none", "heads": 1}]
    configs += [
        {**base, "mode": "lte", "quant": q, "heads": args.heads, "cache": cache}
        for q in args.quants.split(",")
    ]
    if args.eager_build:
        configs.append({**configs[1], "eager": True})
    if args.compare_cache:
        configs.append({**configs[1], "cache": not cache})
    rows = []
    for cfg in configs:
        run = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True
        )
        if run.returncode:
            print(run.stderr, file=sys.stderr)
            return run.returncode
        rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(
        f"{args.model} on {args.device}"
        + (f" ({full['card']})" if "card" in full else "")
        + f", image {args.image_size}/{args.patch_size}, batch {args.batch_size} per head, r {args.rank}, "
        f"LTE heads {args.heads}, precision {base['precision']}"
    )
    print(
        "| run | model state MB | weights MB | grads MB | optimiser MB | state / full | build peak MB | peak MB | step s | step / full |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        name = f"full {r['precision']} AdamW" if r["mode"] == "full" else f"LTE {r['quant']} base"
        name += ", eager build" if r.get("eager") else ""
        name += (", frozen weight cached" if r["cache"] else ", no cache") if r["mode"] == "lte" else ""
        mb = 1 / 2**20
        print(
            f"| {name} | {r['model_state_bytes'] * mb:.0f} | {r['weights_and_buffers'] * mb:.0f} | {r['grads'] * mb:.0f} | "
            f"{r['optimizer'] * mb:.0f} | {r['model_state_bytes'] / full['model_state_bytes']:.3f} | {r['build_peak_bytes'] * mb:.0f} | {r['peak_bytes'] * mb:.0f} | "
            f"{r['step_s_median']:.3f} | {r['step_s_median'] / full['step_s_median']:.2f} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
