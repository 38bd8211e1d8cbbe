"""The bytes of one full sync round at W = N workers, one head each, over real gRPC (issue 23).

    python bench/sync_round.py --model vit-b --heads 32 --merge-every 2 --json /tmp/sync_round.json

A real ``ParameterServer`` in sync mode with N heads, one head per lease, on 127.0.0.1. The N
workers of a W = N job are played one after the other by real ``Worker`` objects in this process
(a vit-b step is seconds on this CPU; N processes would not fit its memory): worker 0 joins
(the whole snapshot), trains its head for T steps and pushes; workers 1 .. N-1 each join, train
their head and push, and are then dropped without leaving (their leases stay until the round
ends, as N real workers' would). The last push merges the round; worker 0, which still holds
version 0's codes, pulls version 1: the delta of a whole sync round, N head merges. A gRPC client
interceptor (bench/comm.py's ``ByteCounter``) counts every message each worker's channel sends
and receives.

Per real worker of a W = N job, one round moves one push (its head's factors) up and one pull
(the round's delta) down; per sample = those bytes / (T x batch).

``--calibrate`` also runs bench/comm.py's async measurement (one worker, one head, each pull
spanning one merge) at this ``--merge-every`` for ``--calibrate-rounds`` rounds, so the one-merge
delta at this T can be compared with the one at T = 10 in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comm import ByteCounter, diff, measure_lte, uptime  # noqa: E402
from mdsections import machine  # noqa: E402

from lte.common.data.datasets import load_dataset  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.proto import parameter_server_pb2_grpc as pb_grpc  # noqa: E402
from lte.server.coordinator import Coordinator  # noqa: E402
from lte.server.grpc_server import ParameterServer  # noqa: E402
from lte.worker.client import JobDone, Worker  # noqa: E402


def counted_worker(address: str, counter: ByteCounter) -> Worker:
    worker = Worker(address, max_heads=1, quiet=True)
    worker.channel = grpc.intercept_channel(worker.channel, counter)
    worker.stub = pb_grpc.ParameterServerStub(worker.channel)
    return worker


def train_and_push(worker: Worker) -> dict:
    turn = worker.turns[0]
    t = time.perf_counter()
    stats = turn.trainer.train_round()
    t_train = time.perf_counter() - t
    reply = worker.push(turn, stats)
    if not reply.applied:
        raise RuntimeError(f"push not applied: {reply}")
    return {"samples": stats.samples, "train_s": t_train, "head": turn.head_ids[0]}


def measure_round(job: JobConfig, ds, heads: int) -> dict:
    coordinator = Coordinator(job, None, heads_per_worker=1, max_staleness=10**6, lease_timeout_s=3600.0)
    out: dict = {"workers": []}
    with ParameterServer(coordinator, host="127.0.0.1", port=0) as server:
        first_counter = ByteCounter()
        first = counted_worker(server.address, first_counter)
        first.register()  # Register + the whole snapshot of version 0
        join = diff(first_counter.snapshot(), {})
        threading.Thread(target=first.heartbeat.loop, daemon=True).start()
        before = first_counter.snapshot()
        row = train_and_push(first)
        out["workers"].append({**row, "push": diff(first_counter.snapshot(), before)})
        for i in range(1, heads):
            counter = ByteCounter()
            worker = counted_worker(server.address, counter)
            worker.register()
            joined = counter.snapshot()
            row = train_and_push(worker)
            out["workers"].append({**row, "push": diff(counter.snapshot(), joined)})
            worker.stop.set()
            worker.channel.close()
            print(f"  head {row['head']} pushed ({i + 1}/{heads}); train {row['train_s']:.1f} s", flush=True)
            del worker
        if coordinator.version < 1:
            raise RuntimeError(f"the round did not merge: version {coordinator.version}")
        before = first_counter.snapshot()
        with contextlib.suppress(JobDone):
            pulled = first.pull(wait_s=30.0)
        if not pulled or first.version != 1:
            raise RuntimeError(f"worker 0 did not pull version 1 (pulled {pulled}, holds {first.version})")
        out["join"] = join
        out["pull"] = diff(first_counter.snapshot(), before)
        out["delta_pulls"] = first.puller.delta_pulls
        first.stop.set()
        first.leave()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b")
    p.add_argument("--heads", type=int, default=32, help="N = W: heads, one per worker")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--scale", type=float, default=64.0, help="s = alpha / r")
    p.add_argument("--merge-every", type=int, default=2, help="T, local steps per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--quant", default="int8")
    p.add_argument("--uplink", default="fp16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calibrate", action="store_true", help="also the one-merge delta at this T (async)")
    p.add_argument("--calibrate-rounds", type=int, default=2)
    p.add_argument("--json", required=True, help="save the measurements here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist", seed=0)
    job = JobConfig(
        model=args.model,
        dataset="fashion-mnist",
        image_size=args.image_size,
        patch_size=args.patch_size,
        heads=args.heads,
        rank=args.rank,
        alpha=args.scale * args.rank,
        merge_every=args.merge_every,
        batch_size=args.batch_size,
        quant=args.quant,
        uplink=args.uplink,
        mode="sync",
        steps=args.merge_every * 2,
    ).with_dataset(ds)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %d %Y %H:%M UTC"),
        "machine": machine(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "load_start": uptime(),
        **vars(args),
    }
    result: dict = {"meta": meta}
    t0 = time.perf_counter()
    print(f"[{args.model}] sync round, {args.heads} heads, T {args.merge_every} ...", flush=True)
    result["round"] = measure_round(job, ds, args.heads)
    result["round"]["seconds"] = time.perf_counter() - t0
    Path(args.json).write_text(json.dumps(result, indent=1))
    if args.calibrate:
        t = time.perf_counter()
        print(f"[{args.model}] async, one merge per pull, T {args.merge_every} ...", flush=True)
        comm_args = argparse.Namespace(**{**vars(args), "heads": args.heads})
        result["one_merge"] = measure_lte(
            args.model, comm_args, ds, args.rank, args.quant, 1, args.uplink, args.calibrate_rounds
        )
        result["one_merge"]["seconds"] = time.perf_counter() - t
    meta["load_end"] = uptime()
    meta["minutes"] = (time.perf_counter() - t0) / 60
    Path(args.json).write_text(json.dumps(result, indent=1))
    r = result["round"]
    pushes = [w["push"]["up"]["wire"] for w in r["workers"]]
    print(
        f"join {r['join']['down']['wire'] / 1e6:.2f} MB; push mean {sum(pushes) / len(pushes) / 1e6:.2f} MB; "
        f"round pull {r['pull']['down']['wire'] / 1e6:.2f} MB (delta pulls {r['delta_pulls']})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
