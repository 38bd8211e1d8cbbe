"""How big a delta-coded snapshot is against the full one, by how many head merges it spans.

    python bench/delta_span.py --model vit-tiny --heads 32 --rank 16

A worker pulls v -> v'. In a sync job v' is one round later: all N heads merged. In an async job
with W workers a worker is about W pushes behind. bench/comm.py measures one worker and one
async push (a span of one head merge, weight 1/N). This bench trains N heads for two sync rounds
(``lte.common.job.trainer.LocalTrainer``, all heads vectorised, from the job's seed), then merges the
second round's heads into W one at a time (``apply_updates``, weight 1/N each, replicas likewise:
after N merges W is exactly the sync round's), and builds the server's snapshot after each
(``server/snapshots.py``: int8-row codes, zstd level 1). For spans 1, 2, 4, ... N it reports the
payload of the delta from the round's start against the full snapshot's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lte.common.core.merge import apply_updates  # noqa: E402
from lte.common.data.datasets import load_dataset  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.trainer import LocalTrainer, build_job_model, linear_weight_names, make_snapshot  # noqa: E402
from lte.server.snapshots import SnapshotBuilder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-tiny")
    p.add_argument("--heads", type=int, default=32, help="N")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scale", type=float, default=64.0, help="s = alpha / r (bench/comm.py's)")
    p.add_argument("--merge-every", type=int, default=10, help="T")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quant", default="int8")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="save the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist", seed=0)
    job = JobConfig(
        model=args.model, dataset="fashion-mnist", heads=args.heads, rank=args.rank,
        alpha=args.scale * args.rank, merge_every=args.merge_every, batch_size=args.batch_size,
        quant=args.quant, lr=args.lr, steps=args.merge_every * 100,
    ).with_dataset(ds)  # fmt: skip
    plain = build_job_model(job)
    master = {k: v.clone() for k, v in plain.state_dict().items()}
    layers = linear_weight_names(plain, job.embedding_heads)
    trainer = LocalTrainer(job, list(range(job.heads)), ds)
    builder = SnapshotBuilder(job, layers, delta_history=2 * job.heads + 4)
    version = 0

    def build():
        return builder.get(
            lambda: version,
            lambda: (version, {k: (v.flatten(1) if k in layers else v).clone() for k, v in master.items()}),
        )

    prev: dict = {}
    t0 = time.perf_counter()
    rows = []
    for round_index in range(2):
        trainer.load_snapshot(make_snapshot(master, layers, job.quant))
        trainer.train_round()
        heads, rep = trainer.export_update()
        if round_index == 0:
            apply_updates(master, prev, heads, [1 / job.heads] * len(heads), [(1.0, rep)], scale=job.scale)
            trainer.commit()
            continue
        _, _, full0 = build()
        start = version
        for k, head in enumerate(heads, 1):
            version += 1
            apply_updates(master, prev, [head], [1 / job.heads], [(1 / job.heads, rep)], scale=job.scale)
            if k & (k - 1) == 0 or k == len(heads):  # powers of two, and the whole round
                _, _, full = build()
                got = builder.delta(version, start)
                assert got is not None
                rows.append({"span": k, "full": full, "delta": got[1], "ratio": got[1] / full})
                print(
                    f"span {k:3d} head merges: full {full / 1e6:.2f} MB, delta {got[1] / 1e6:.3f} MB ({got[1] / full:.3f})",
                    flush=True,
                )
    print(
        f"({time.perf_counter() - t0:.0f} s; {args.model}, N {job.heads}, r {job.rank}, T {job.merge_every}, {job.quant})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
