"""One rank of a data-parallel baseline over gloo: PyTorch DDP, or DiLoCo. bench/wan/run.py starts one
per worker host (inside its network namespace); this file is also runnable by hand:

    python bench/wan/baselines.py --method ddp --rank 0 --world 2 --master 10.77.0.10:29500 ...

DDP: ``torch.nn.parallel.DistributedDataParallel`` over ``torch.distributed`` (gloo), AdamW on the
full model, one all-reduce of the fp32 gradient per step.

DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of Language
Models", Algorithm 1): every replica runs H inner AdamW steps on its own copy from the global
parameters theta; the outer gradient is the replicas' mean of (theta - theta_local), all-reduced
over gloo; an outer SGD with Nesterov momentum (the paper's lr 0.7, momentum 0.9) updates theta,
and every replica restarts from it, keeping its inner AdamW state.

Both see the same data as LTE's heads: each rank samples its own batches (seeded by rank) from the
train split, with the job's warm-up + cosine learning rate (``lte.common.job.trainer.lr_at``) over its
``--steps`` local steps. Rank 0 evaluates on the same test subset as lte-server's
``--eval-samples`` and appends ``{"time", "wall", "step", "samples", "test_accuracy"}`` lines to
``--out`` (time: seconds since all ranks joined; wall: the Unix time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lte.common.data.datasets import eval_subset, load_dataset
from lte.common.job.config import JobConfig
from lte.common.job.models import build_model
from lte.common.job.trainer import lr_at


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 1000):
            correct += int((model(x[i : i + 1000]).argmax(-1) == y[i : i + 1000]).sum())
    model.train()
    return correct / max(1, len(y))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=["ddp", "diloco"], required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="host:port of rank 0's store")
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=200, help="local steps per rank")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW (DiLoCo: inner) peak lr")
    p.add_argument("--inner-steps", type=int, default=10, help="DiLoCo's H")
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--eval-every", type=int, default=20, help="steps between evaluations (rank 0)")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="rank 0: metrics JSON lines")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    host, _, port = args.master.rpartition(":")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{host}:{port}",
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=600),
    )
    data = load_dataset(args.dataset, seed=args.seed)
    test = eval_subset(data, args.eval_samples, args.seed)
    job = JobConfig(model=args.model, dataset=args.dataset, lr=args.lr, steps=args.steps)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP checks it too)
    model = build_model(args.model, image_size=data.image_size, in_channels=data.in_channels, num_classes=10)
    net = torch.nn.parallel.DistributedDataParallel(model) if args.method == "ddp" else model
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    glob = [q.detach().clone() for q in model.parameters()]  # DiLoCo's theta
    outer = torch.optim.SGD(
        [torch.nn.Parameter(g) for g in glob], lr=args.outer_lr, momentum=args.outer_momentum, nesterov=True
    )
    theta = outer.param_groups[0]["params"]
    gen = torch.Generator().manual_seed(args.seed * 1000 + args.rank)
    out = open(args.out, "a") if args.rank == 0 else None  # noqa: SIM115 (closed below; rank 0 only)
    dist.barrier()
    t0 = time.monotonic()
    for step in range(args.steps):
        for group in inner.param_groups:
            group["lr"] = lr_at(step, job)
        idx = torch.randint(0, len(data.train_y), (args.batch_size,), generator=gen)
        loss = F.cross_entropy(net(data.train_x[idx]), data.train_y[idx])
        inner.zero_grad(set_to_none=True)
        loss.backward()
        inner.step()
        synced = args.method == "ddp" or (step + 1) % args.inner_steps == 0 or step + 1 == args.steps
        if args.method == "diloco" and synced:
            with torch.no_grad():
                deltas = [t.detach() - q.detach() for t, q in zip(theta, model.parameters(), strict=True)]
                flat = torch.cat([d.reshape(-1) for d in deltas])
                dist.all_reduce(flat)  # one fp32 all-reduce of the pseudo-gradient per outer step
                flat /= args.world
                offset = 0
                for t in theta:
                    t.grad = flat[offset : offset + t.numel()].view_as(t).clone()
                    offset += t.numel()
            outer.step()
            with torch.no_grad():
                for t, q in zip(theta, model.parameters(), strict=True):
                    q.copy_(t)
        if out is not None and synced and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record = {
                "time": round(time.monotonic() - t0, 3),
                "wall": time.time(),  # the bench counts from its own start of the processes
                "step": step + 1,
                "samples": (step + 1) * args.batch_size * args.world,
                "test_accuracy": evaluate(model, test.test_x, test.test_y),
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
    dist.barrier()
    if out is not None:
        out.write(json.dumps({"done": True, "time": round(time.monotonic() - t0, 3)}) + "\n")
        out.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
