"""gpt-micro on the King James Bible (byte-level): LTE against full training with `lte-sim`.

Every row is one `lte-sim` command (printed in the table). Phase 1 sweeps each method's learning
rate on seed 0 (full training at 1.0x tokens, LTE at 1.3x tokens); phase 2 repeats the best of
each on the other seeds and adds LTE at 1.0x tokens. Validation: the same windows of val.bin for
every run (`--dataset text` evaluates `eval_tokens` tokens spread over the file).

    python bench/lm_kjv.py --data-dir data/kjv --steps 80 --ratio 1.3 --out bench/results/lm-kjv.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time


def command(args: argparse.Namespace, *, full: bool, lr: float, seed: int, steps: int) -> list[str]:
    cmd = ["lte-sim", "--model", "gpt-micro", "--dataset", "text", "--data-dir", args.data_dir]
    cmd += ["--heads", str(args.heads), "--batch-size", str(args.batch_size)]
    cmd += ["--merge-every", str(args.merge_every), "--steps", str(steps), "--lr", f"{lr:g}"]
    cmd += ["--seed", str(seed), "--threads", "1", "--quiet", "--json"]
    if full:
        cmd.append("--full")
    else:
        cmd += ["--rank", str(args.rank), "--alpha", f"{args.alpha:g}"]
    return cmd


def run(cmd: list[str], log: list[dict], out: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    exe = os.path.join(os.path.dirname(sys.executable), cmd[0])
    start = time.perf_counter()
    proc = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record.update(command=shlex.join(cmd), wall_s=round(time.perf_counter() - start, 1))
    log.append(record)
    print(f"{record['test_loss']:.4f}  {record['wall_s']:>6.1f}s  {record['command']}", flush=True)
    if out:
        with open(out, "w") as fh:
            json.dump(log, fh, indent=1)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=80, help="steps at 1.0x tokens")
    p.add_argument("--ratio", type=float, default=1.3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--alpha", type=float, default=1024.0)
    p.add_argument("--merge-every", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr-full", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--lr-lte", type=float, nargs="+", default=[1e-4, 3e-4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", help="JSON file of every run (rewritten after each)")
    args = p.parse_args()
    long = round(args.steps * args.ratio)
    log: list[dict] = []
    first, rest = args.seeds[0], args.seeds[1:]
    full = {
        lr: run(command(args, full=True, lr=lr, seed=first, steps=args.steps), log, args.out)
        for lr in args.lr_full
    }
    lte = {
        lr: run(command(args, full=False, lr=lr, seed=first, steps=long), log, args.out) for lr in args.lr_lte
    }
    best_full = min(full, key=lambda lr: full[lr]["test_loss"])
    best_lte = min(lte, key=lambda lr: lte[lr]["test_loss"])
    for seed in rest:
        run(command(args, full=True, lr=best_full, seed=seed, steps=args.steps), log, args.out)
        run(command(args, full=False, lr=best_lte, seed=seed, steps=long), log, args.out)
    for seed in args.seeds:
        run(command(args, full=False, lr=best_lte, seed=seed, steps=args.steps), log, args.out)
    print(f"best lr: full {best_full:g}, LTE {best_lte:g}")


if __name__ == "__main__":
    main()
