"""Bytes and seconds of one LTE round over real gRPC, next to what DDP would move for the same samples.

    python bench/round_cost.py --model vit-b --heads 32 --rank 64 --merge-every 10 --quant int8
    python bench/round_cost.py --model gpt2-small --dataset text --data-dir data/kjv --num-classes 50257 \
        --context 1024 --batch-size 1 --heads 32 --rank 64 --quant int8 --rounds 1 [--no-embedding-heads]

A real ParameterServer runs on loopback with the job's model; one real Worker (in this process,
holding ``--worker-heads`` heads) registers, pulls the snapshot, trains T steps, pushes, and
pulls the next version. Bytes are the payload bytes counted at the gRPC layer by both sides.
DDP's figure is the ring all-reduce volume each worker sends per step, 2 (W-1)/W x fp32
gradient bytes, for a DDP job of the same global batch (one replica per head).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from lte.common.data.datasets import load_dataset  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.models import count_parameters  # noqa: E402
from lte.server.coordinator import Coordinator  # noqa: E402
from lte.server.grpc_server import ParameterServer  # noqa: E402
from lte.worker.client import JobDone, Worker  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--image-size", type=int, default=0, help="0: the dataset's (28 for fashion-mnist)")
    p.add_argument("--patch-size", type=int, default=0, help="0: the zoo default (4 on 28x28)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=4096)
    p.add_argument("--merge-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="per head")
    p.add_argument("--quant", default="int8")
    p.add_argument("--uplink", default="fp16")
    p.add_argument("--worker-heads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="rounds timed (the first pull is reported apart)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="dataset folder (--dataset text: token files)")
    p.add_argument("--num-classes", type=int, default=0, help="output width; a GPT's vocabulary [the data's]")
    p.add_argument("--context", type=int, default=0, help="language models: tokens per sequence [preset]")
    p.add_argument(
        "--embedding-heads",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LTE heads on the (tied) token embedding; --no-embedding-heads sends it as a replica",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.data_dir, seed=0)
    job = JobConfig(
        model=args.model,
        dataset=args.dataset,
        image_size=args.image_size,
        patch_size=args.patch_size,
        heads=args.heads,
        rank=args.rank,
        alpha=args.alpha,
        merge_every=args.merge_every,
        batch_size=args.batch_size,
        quant=args.quant,
        uplink=args.uplink,
        mode="async",
        steps=args.merge_every * 1000,
        num_classes=args.num_classes,
        context=args.context,
        embedding_heads=args.embedding_heads,
    ).with_dataset(ds)
    coordinator = Coordinator(job, None, heads_per_worker=args.worker_heads, max_staleness=10**6)
    params = count_parameters(coordinator.model)
    with ParameterServer(coordinator, host="127.0.0.1", port=0) as server:
        worker = Worker(server.address, max_heads=args.worker_heads, quiet=True, data_dir=args.data_dir)
        t0 = time.perf_counter()
        worker.register()  # includes the first pull of the snapshot
        first_pull_s = time.perf_counter() - t0
        first_down = worker.bytes_down
        rounds = []
        for _ in range(args.rounds):
            up0, down0 = worker.bytes_up, worker.bytes_down
            t = time.perf_counter()
            turn = worker.turns[0]  # one turn: the worker holds no more heads than its room
            stats = turn.trainer.train_round()
            t_train = time.perf_counter() - t
            reply = worker.push(turn, stats)
            turn.trainer.commit()
            for h in worker.next_rounds:
                worker.next_rounds[h] += 1
            t_push = time.perf_counter() - t - t_train
            with contextlib.suppress(JobDone):
                worker.pull(wait_s=0.0)
            t_total = time.perf_counter() - t
            rounds.append(
                {
                    "train_s": t_train,
                    "push_s": t_push,
                    "pull_s": t_total - t_train - t_push,
                    "round_s": t_total,
                    "up": worker.bytes_up - up0,
                    "down": worker.bytes_down - down0,
                    "version": reply.version,
                }
            )
        worker.stop.set()
        worker.leave()
    per_head_up = sum(r["up"] for r in rounds) / len(rounds) / args.worker_heads
    per_worker_down = sum(r["down"] for r in rounds) / len(rounds)
    samples_per_round_per_head = args.merge_every * args.batch_size
    ddp_workers = args.heads
    ddp_step_bytes = 2 * (ddp_workers - 1) / ddp_workers * params * 4
    ddp_round = ddp_step_bytes * args.merge_every
    result = {
        "model": args.model,
        "params": params,
        "heads": args.heads,
        "rank": args.rank,
        "T": args.merge_every,
        "quant": args.quant,
        "uplink": args.uplink,
        "embedding_heads": args.embedding_heads,
        "context": job.context,
        "worker_heads": args.worker_heads,
        "batch_per_head": args.batch_size,
        "first_pull_bytes": first_down,
        "first_pull_s": round(first_pull_s, 2),
        "up_bytes_per_round_per_head": per_head_up,
        "down_bytes_per_round_per_worker": per_worker_down,
        "down_bytes_per_round_per_head": per_worker_down / args.worker_heads,
        "round_s": [round(r["round_s"], 2) for r in rounds],
        "train_s": [round(r["train_s"], 2) for r in rounds],
        "push_s": [round(r["push_s"], 3) for r in rounds],
        "pull_s": [round(r["pull_s"], 3) for r in rounds],
        "ddp_bytes_per_round_per_worker": ddp_round,
        "ddp_over_lte_up": ddp_round / per_head_up,
        "ddp_over_lte_total": ddp_round / (per_head_up + per_worker_down / args.worker_heads),
        "samples_per_round_per_head": samples_per_round_per_head,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:34s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
