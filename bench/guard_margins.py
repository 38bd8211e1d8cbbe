"""How far honest pushes stay inside the update guard's bounds, per zoo model (issue 24, item 1).

Runs short sync LTE jobs (the emulator's loop: ``LocalTrainer`` per worker, ``apply_updates`` on plain
master weights) and, before every merge, measures each head's per-layer contribution the way the
server's guard does (``lte.server.guard``): its norm over the running median of accepted ones
and how far each factor entry moved against the AdamW step bound. Prints, per model, the largest
fraction of each bound that an honest push used (the guard fires above 1.0).

    python bench/guard_margins.py --models mlp vit-micro gpt-micro --rounds 12
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from lte.commands.sim import partition_heads
from lte.common.core.merge import apply_updates
from lte.common.data.datasets import load_dataset
from lte.common.data.text import ByteTokenizer, load_text, write_token_files
from lte.common.job.config import JobConfig
from lte.common.job.models import MODEL_NAMES
from lte.common.job.trainer import LocalTrainer, build_job_model, linear_weight_names, make_snapshot
from lte.server.guard import GuardSettings, UpdateGuard

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void. " * 40
)


def job_for(model: str, rounds: int, folder: str, **kw) -> tuple[JobConfig, object]:
    if model.startswith("gpt"):
        data = load_text(folder, eval_tokens=256)
        base = dict(dataset="text", context=16, batch_size=2)
    else:
        data = load_dataset("digits", seed=0)
        base = dict(dataset="digits", batch_size=8)
    values = dict(model=model, heads=4, rank=8, alpha=32.0, merge_every=5, steps=5 * rounds, lr=1e-3, **base)
    values.update(kw)
    return JobConfig(**values).with_dataset(data), data


def margins(job: JobConfig, data, workers: int = 2) -> dict:
    """The largest value / bound over the run, per check, of honest pushes at the default thresholds."""
    from lte.common.job.trainer import lr_at

    master = build_job_model(job).state_dict()
    layers = linear_weight_names(build_job_model(job), job.embedding_heads)
    trainers = [LocalTrainer(job, ids, data) for ids in partition_heads(job.heads, workers)]
    guard = UpdateGuard(GuardSettings(), job)
    prev: dict = {}
    worst = {"median": 0.0, "step": 0.0}
    steps_done = 0
    for _ in range(job.rounds):
        lr_sum = sum(lr_at(t, job) for t in range(steps_done, steps_done + job.round_steps(steps_done)))
        steps_done += job.round_steps(steps_done)
        snap = make_snapshot(master, layers, job.quant)
        heads, reps = [], []
        for t in trainers:
            t.load_snapshot(snap)
            t.train_round()
            h, rep = t.export_update()
            heads += h
            reps.append((rep.heads / job.heads, rep))
        for (_, rep), t in zip(reps, trainers, strict=True):
            mine = {u.head_id: u.factors for u in heads if u.head_id in t.head_ids}
            verdict = guard.check(mine, prev, rep.deltas, {h: lr_sum for h in mine})
            assert not verdict.outliers, verdict.describe()
            for h, factors in mine.items():
                for layer, (b, a) in factors.items():
                    bp, ap = prev.get(h, {}).get(layer, (None, None))
                    for now, before in [(b, bp)] + ([(a, ap)] if ap is not None else []):
                        prev_max = float(before.abs().max()) if before is not None else 0.0
                        moved = (
                            float((now - before).abs().max())
                            if before is not None
                            else float(now.abs().max())
                        )
                        bound = guard.step_bound(lr_sum, prev_max, float(now.abs().max()))
                        worst["step"] = max(worst["step"], moved / bound)
            for key, units in verdict.norms.items():
                median = guard.median(key)
                if median:
                    worst["median"] = max(worst["median"], max(units) / (guard.settings.ratio * median))
            guard.accept(verdict)
        apply_updates(
            master, prev, heads, [1 / job.heads] * len(heads), reps, scale=job.scale, reset=job.reset
        )
        for t in trainers:
            t.commit()
    return {
        "model": job.model,
        "lr": job.lr,
        "max_of_median_bound": round(worst["median"], 4),
        "max_of_step_bound": round(worst["step"], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=list(MODEL_NAMES))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_token_files(folder, [TEXT], ByteTokenizer())
        for model in args.models:
            start = time.perf_counter()
            job, data = job_for(model, args.rounds, folder, lr=args.lr)
            out = margins(job, data)
            out["seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
