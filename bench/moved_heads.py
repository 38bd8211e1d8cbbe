"""Heads that move to a fresh worker mid-job: how far the job falls behind an unfailed run.

    python bench/moved_heads.py                    # Fashion-MNIST mlp, heads move at version 20
    python bench/moved_heads.py --move-at 10 --repeat 2

A real ``ParameterServer`` on 127.0.0.1 (port 0) and real ``Worker`` objects, one thread each.
In the moved runs every worker leaves once the server reached ``--move-at`` versions (its heads
go back to the pool with their last factors) and as many new workers take them over: the heads
continue from the server's factors with empty AdamW moments. That is run twice, with the
re-warm-up of such heads (their lr ramps again over the job's warm-up) and without it, against
an unfailed run of the same job. Reported: final test accuracy, and the mean train loss of the
first round after the move against the same round of the unfailed run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.data.datasets import load_dataset  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.trainer import LocalTrainer  # noqa: E402
from lte.server.coordinator import Coordinator  # noqa: E402
from lte.server.grpc_server import ParameterServer  # noqa: E402
from lte.worker import client, turns  # noqa: E402  (turns builds the worker's trainers)


class NoRewarmTrainer(LocalTrainer):
    """The trainer as it was before the re-warm-up: the current lr from the first step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rewarm = False


RUNS = (
    ("unfailed", LocalTrainer),
    ("moved, re-warm-up", LocalTrainer),
    ("moved, no re-warm-up", NoRewarmTrainer),
)


def start_worker(address: str) -> tuple[client.Worker, threading.Thread]:
    worker = client.Worker(address, quiet=True)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def run(job: JobConfig, dataset, workers: int, heads_per_worker: int, move_at: int | None) -> dict:
    coordinator = Coordinator(job, dataset, heads_per_worker=heads_per_worker)
    server = ParameterServer(coordinator, host="127.0.0.1", port=0).start()
    try:
        pool = [start_worker(server.address) for _ in range(workers)]
        if move_at is not None:
            with coordinator.changed:
                if not coordinator.changed.wait_for(lambda: coordinator.version >= move_at, timeout=600):
                    raise RuntimeError(f"the job did not reach version {move_at}")
            for worker, _ in pool:
                worker.stop.set()  # each pushes the round it is in, then leaves: its heads return
            for _, thread in pool:
                thread.join(timeout=120)
            move_at = coordinator.version  # the new workers' first round makes the next version
            pool = [start_worker(server.address) for _ in range(workers)]
        if not server.wait_done(timeout=1200):
            raise RuntimeError("the job did not finish")
        for _, thread in pool:
            thread.join(timeout=120)
        losses = {r["version"]: r["train_loss"] for r in coordinator.history}
        return {"accuracy": coordinator.evaluate_now()["test_accuracy"], "losses": losses, "moved": move_at}
    finally:
        server.stop(grace=0.5)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--move-at", type=int, default=20, help="version after which every worker leaves")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    dataset = load_dataset(args.dataset, seed=0)
    job = JobConfig(
        model="mlp",
        dataset=args.dataset,
        heads=4,
        rank=16,
        alpha=64.0,
        lr=1e-2,
        steps=args.steps,
        merge_every=10,
        batch_size=args.batch_size,
    ).with_dataset(dataset)
    print(
        f"mlp on {args.dataset}: 4 heads on 2 workers, r 16, T 10, batch {args.batch_size}, "
        f"{job.rounds} sync rounds, lr 1e-2 with {job.warmup} warm-up steps; heads move after "
        f"version {args.move_at}",
        flush=True,
    )
    rows = []
    for _ in range(args.repeat):
        unfailed = None
        for name, trainer in RUNS:
            turns.LocalTrainer = trainer  # the class TrainerOptions.build makes each turn's trainer of
            started = time.perf_counter()
            out = run(job, dataset, 2, 2, None if unfailed is None else args.move_at)
            out.update(name=name, seconds=time.perf_counter() - started)
            unfailed = unfailed or out
            first = (out["moved"] or unfailed["moved"] or args.move_at) + 1  # the moved heads' first round
            out["gap"] = out["accuracy"] - unfailed["accuracy"]
            out["first_loss"], out["unfailed_loss"] = out["losses"][first], unfailed["losses"][first]
            rows.append(out)
            print(
                f"  {name}: accuracy {out['accuracy']:.4f}, loss of version {first} {out['first_loss']:.3f} "
                f"(unfailed {out['unfailed_loss']:.3f}), {out['seconds']:.0f} s",
                flush=True,
            )
    turns.LocalTrainer = LocalTrainer
    print("\n| run | test accuracy % | gap to unfailed, points | train loss, first round after the move |")
    print("| --- | ---: | ---: | ---: |")
    for name, _ in RUNS:
        mine = [r for r in rows if r["name"] == name]
        acc = statistics.mean(r["accuracy"] for r in mine) * 100
        gap = statistics.mean(r["gap"] for r in mine) * 100
        loss = statistics.mean(r["first_loss"] for r in mine)
        print(f"| {name} | {acc:.2f} | {gap:+.2f} | {loss:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
