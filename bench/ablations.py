"""The paper's ablations, reproduced small: Fashion-MNIST, the zoo mlp (784-256-256-10).

One factor at a time around a base configuration (the paper's ``N = 32``, ``r = 64``, ``T = 10``,
and lte's default ``A`` init, ``reference``: the paper authors' scale), every run at the same samples
and the same number of steps:

- heads ``N`` in {2, 8, 32}, at a fixed global batch (``N * b`` samples per step), so the heads
  split the same data and only the split changes;
- rank ``r`` in {4, 8, 16, 32, 64};
- merge interval ``T`` in {1, 5, 10, 20, 50};
- the init of ``A`` in {reference, semi-orthogonal, kaiming, xavier}.

The scale ``s = alpha / r`` is fixed (``--scale``, 4 by default: README's tuning rule, alpha = 4 r)
and so is the learning rate (``--lr-rule constant``, ``--lr-lte`` 1e-3 = full training's lr): with
the reference init a step moves ``W`` by about ``s * lr`` per entry whatever the rank (README,
"Tuning LTE for a new model"). ``--lr-rule inverse-rank`` is the rule the earlier ``semi-orthogonal``
init needed (``lr_lte ~ lr_full * fan_in / alpha``: with ``s`` fixed, ``lr = lr_lte * r_base / r``);
BENCHMARKS.md's table ran with it at ``--scale 64 --lr-lte 3e-4``. Full training of the same model on
the same samples is the reference row.

Training is ``lte.commands.sim``'s ``run_lte`` / ``run_full``; this file only builds the jobs and
writes the table. ``--cache FILE`` keeps one JSON line per finished run, so that seeds can run in
separate processes and a later call (``--seeds 0 1 --cache FILE``) only assembles the table::

    python bench/ablations.py --threads 1                      # seed 0, prints the table
    python bench/ablations.py --threads 1 --seeds 0 1 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lte.commands.sim import run_full, run_lte
from lte.common.core.layers import A_INITS
from lte.common.data.datasets import Dataset, load_dataset
from lte.common.job.config import JobConfig

SECTION_START = "<!-- ablations:start -->"
SECTION_END = "<!-- ablations:end -->"
SECTION_TITLE = "## The paper's ablations, reproduced small (issue 6, item 7)"
LR_RULES = ("constant", "inverse-rank")

# What the paper reports (ViT-S on ImageNet100, as summarised in shared/seed/paper-summary.md and
# docs/design.md section 2) at its base configuration; its trends are in FACTORS below.
PAPER_NUMBERS = "full training 71.97 %, LTE 73.73 % at N = 32, r = 64, T = 10"


@dataclass(frozen=True)
class Setting:
    """One LTE run of the sweep (or the full-training reference, ``factor == "full"``)."""

    factor: str  # full | base | heads | heads_b | rank | merge_every | a_init
    heads: int
    rank: int
    merge_every: int
    a_init: str
    batch: int = 0  # samples per head per step; 0: the global batch split over the heads

    def key(self, seed: int) -> str:
        own = f"|b{self.batch}" if self.batch else ""
        return f"{self.factor}|N{self.heads}|r{self.rank}|T{self.merge_every}|{self.a_init}{own}|seed{seed}"

    def same_run(self, other: Setting) -> bool:
        return (self.heads, self.rank, self.merge_every, self.a_init) == (
            other.heads,
            other.rank,
            other.merge_every,
            other.a_init,
        )


# factor -> (Setting field it varies, table label, paper's trend)
FACTORS = {
    "heads": ("heads", "heads N (global batch fixed)", "rises with N"),
    "rank": ("rank", "rank r", "rises with r; falls for r <= 16"),
    "merge_every": ("merge_every", "T", "falls for T >= 20"),
    "a_init": ("a_init", "A init", "(no number in our summary; the paper uses semi-orthogonal)"),
    "heads_b": ("heads", "heads N (batch per head fixed)", "rises with N"),
}


def factor_values(args: argparse.Namespace) -> dict[str, list[Any]]:
    return {
        "heads": args.heads,
        "rank": args.ranks,
        "merge_every": args.merge_every,
        "a_init": args.a_inits,
        "heads_b": args.heads if args.head_batch else [],
    }


def base_setting(args: argparse.Namespace) -> Setting:
    return Setting("base", args.base_heads, args.base_rank, args.base_merge_every, args.base_a_init)


def settings(args: argparse.Namespace) -> list[Setting]:
    """Full training, the base, then each factor's values with the others at the base (base not repeated)."""
    base = base_setting(args)
    out = [Setting("full", 0, 0, 0, "-"), base]
    for factor, values in factor_values(args).items():
        for v in values:
            s = dataclasses.replace(base, factor=factor, **{FACTORS[factor][0]: v})
            if factor == "heads_b":
                s = dataclasses.replace(s, batch=args.head_batch)
                if s.same_run(base) and args.head_batch * base.heads == args.global_batch:
                    continue
            elif s.same_run(base):
                continue
            out.append(s)
    return out


def group(args: argparse.Namespace, factor: str) -> list[tuple[Any, Setting, bool]]:
    """(value, the setting whose runs hold it, is_base) for each value of ``factor``, in order."""
    field = FACTORS[factor][0]
    rows = settings(args)
    base = rows[1]
    out = []
    for v in factor_values(args)[factor]:
        found = next((s for s in rows if s.factor == factor and getattr(s, field) == v), None)
        out.append((v, found or base, found is None))
    return out


def lr_for(args: argparse.Namespace, s: Setting) -> float:
    """s fixed, so alpha = s * r. ``constant``: ``--lr-lte`` at every rank (the reference init's W
    step is about s * lr whatever r); ``inverse-rank``: the earlier init's rule of thumb
    lr ~ fan_in / alpha, so lr proportional to 1 / r."""
    if s.factor == "full":
        return args.lr_full
    if args.lr_rule == "constant":
        return args.lr_lte
    return args.lr_lte * args.base_rank / s.rank


def job_for(args: argparse.Namespace, s: Setting, seed: int, data: Dataset) -> JobConfig:
    heads = s.heads or args.base_heads
    if not s.batch and args.global_batch % heads:
        raise SystemExit(f"ablations: --global-batch {args.global_batch} is not a multiple of N = {heads}")
    steps = args.steps
    if s.factor != "full" and steps % s.merge_every:
        raise SystemExit(f"ablations: --steps {steps} is not a multiple of T = {s.merge_every}")
    rank = s.rank or args.base_rank
    return JobConfig(
        model="mlp",
        dataset="fashion-mnist",
        heads=heads,
        rank=rank,
        alpha=args.scale * rank,
        merge_every=s.merge_every or args.base_merge_every,
        a_init=s.a_init if s.a_init in A_INITS else args.base_a_init,
        lr=lr_for(args, s),
        steps=steps,
        batch_size=s.batch or args.global_batch // heads,
        seed=seed,
    ).with_dataset(data)


def run_one(args: argparse.Namespace, s: Setting, seed: int, data: Dataset) -> dict[str, Any]:
    job = job_for(args, s, seed, data)
    result = run_full(job, data) if s.factor == "full" else run_lte(job, data)
    return {
        "key": s.key(seed),
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "samples": result.samples,
        "steps": result.steps,
        "rounds": result.rounds,
        "seconds": round(result.seconds, 2),
        "lr": job.lr,
        "alpha": job.alpha,
        "batch_size": job.batch_size,
    }


def cached(results: dict[str, dict[str, Any]], args: argparse.Namespace, s: Setting, seed: int) -> bool:
    """Whether ``results`` holds the run of ``s`` and ``seed`` at this sweep's lr and alpha (a record
    from before ``alpha`` was recorded matches on its lr alone)."""
    record = results.get(s.key(seed))
    if record is None or record.get("lr") != lr_for(args, s):
        return False
    return s.factor == "full" or record.get("alpha", args.scale * s.rank) == args.scale * s.rank


def load_cache(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["key"]] = record
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# The table


def fmt(values: list[float], signed: bool = False) -> str:
    mean = statistics.fmean(values) * 100
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) * 100:.2f}"
    return text


def accs(results: dict[str, dict[str, Any]], s: Setting, seeds: list[int]) -> list[float]:
    return [results[s.key(k)]["test_accuracy"] for k in seeds]


def table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[str]:
    seeds = args.seeds
    rows = settings(args)
    full, base = accs(results, rows[0], seeds), accs(results, rows[1], seeds)
    lines = [
        "| factor | value | N x r | batch per head | samples | lr | test acc (%) | Δ vs base | Δ vs full "
        "| paper's trend | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    recs = [results[rows[0].key(k)] for k in seeds]
    lines.append(
        f"| full training | - | - | {args.global_batch} (one model) | {recs[0]['samples']} | {recs[0]['lr']:.3g} "
        f"| {fmt(full)} | - | - | paper: 71.97 % | {sum(r['seconds'] for r in recs):.0f} |"
    )
    for factor, (_, label, trend) in FACTORS.items():
        for value, s, is_base in group(args, factor):
            recs = [results[s.key(k)] for k in seeds]
            acc = [r["test_accuracy"] for r in recs]
            lines.append(
                f"| {label} | {value}{' (base)' if is_base else ''} | {s.heads * s.rank} "
                f"| {recs[0]['batch_size']} | {recs[0]['samples']} | {recs[0]['lr']:.3g} | {fmt(acc)} "
                f"| {fmt([a - b for a, b in zip(acc, base, strict=True)], True)} "
                f"| {fmt([a - b for a, b in zip(acc, full, strict=True)], True)} "
                f"| {trend}{'; paper: 73.73 %' if is_base and factor == 'heads' else ''} "
                f"| {sum(r['seconds'] for r in recs):.0f} |"
            )
    return lines


def trend_lines(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> list[str]:
    """Plain statements: does each factor move accuracy the way the paper found?"""
    out = []
    for factor, (_, label, _) in FACTORS.items():
        points = [
            (v, statistics.fmean(accs(results, s, args.seeds)) * 100) for v, s, _ in group(args, factor)
        ]
        if not points:
            continue
        series = ", ".join(f"{v}: {a:.2f}" for v, a in points)
        if factor == "a_init":
            best = max(points, key=lambda p: p[1])
            out.append(f"- {label}: {series}; best {best[0]}")
            continue
        points.sort()
        values = [a for _, a in points]
        steps = [b - a for a, b in zip(values, values[1:], strict=False)]
        if factor == "merge_every":
            small = statistics.fmean(a for v, a in points if v < 20)
            large = statistics.fmean(a for v, a in points if v >= 20)
            verdict = f"T >= 20 averages {large - small:+.2f} points against T < 20: " + (
                "falls, as in the paper" if large < small else "does not fall, unlike the paper"
            )
        elif all(d > 0 for d in steps):
            verdict = "rises at every step, as in the paper"
        elif all(d < 0 for d in steps):
            verdict = f"falls at every step ({values[-1] - values[0]:+.2f} points), unlike the paper"
        else:
            verdict = (
                f"{values[-1] - values[0]:+.2f} points from the smallest value to the largest, "
                f"steps {', '.join(f'{d:+.2f}' for d in steps)}: not monotonic"
            )
        out.append(f"- {label}: {series} -> {verdict}")
    return out


def section(args: argparse.Namespace, argv: list[str], results: dict[str, dict[str, Any]]) -> str:
    command = shlex.join(["python", "bench/ablations.py", *argv])
    rows = table(args, results)
    minutes = sum(results[x.key(k)]["seconds"] for x in settings(args) for k in args.seeds) / 60
    return "\n".join(
        [
            SECTION_START,
            SECTION_TITLE,
            "",
            f"Generated by `bench/ablations.py` on {time.strftime('%a %b %d %Y', time.gmtime())} (UTC), "
            f"{platform.machine()} CPU, torch {torch.__version__}, `--threads {args.threads}`; the runs' "
            f"training wall clock adds up to {minutes:.1f} min. Reproduce with:",
            "",
            "```",
            command,
            "```",
            "",
            f"Fashion-MNIST, the zoo mlp (784-256-256-10), {args.steps} steps of {args.global_batch} samples "
            f"({args.steps * args.global_batch} samples, {args.steps * args.global_batch / 60000:.1f} epochs) "
            f"for every row but the last group (below), evaluated on all 10000 test images; {len(args.seeds)} seed(s) "
            f"({', '.join(map(str, args.seeds))}), ± is the standard deviation over seeds. One factor at a time "
            f"around the base N = {args.base_heads}, r = {args.base_rank}, T = {args.base_merge_every}, "
            f"A {args.base_a_init}"
            + (
                " (the paper's ViT-S setting)"
                if (args.base_heads, args.base_rank, args.base_merge_every) == (32, 64, 10)
                else ""
            )
            + f". The global batch is fixed, so N heads get "
            f"{args.global_batch} / N samples each per step and every row has the same samples and steps; "
            f"the group 'heads N (batch per head fixed)' repeats the heads sweep with {args.head_batch} samples "
            "per head and step, so its samples grow with N (more workers, more data per step). "
            f"s = alpha / r = {args.scale:g} in every row (alpha = {args.scale:g} r), and the learning rate "
            + (
                f"is {args.lr_lte:g} at every rank (with s fixed, the reference init's step on W is about "
                "s x lr whatever r). Full "
                if args.lr_rule == "constant"
                else f"follows the rule of thumb lr ~ lr_full x fan_in / alpha: lr = {args.lr_lte:g} x "
                f"{args.base_rank} / r (the earlier semi-orthogonal init's rule). Full "
            )
            + f"training: AdamW lr {args.lr_full:g}. Base unquantised, AdamW, 5% warm-up, cosine to 0. "
            "Seconds: wall clock summed over seeds.",
            "",
            *rows,
            "",
            f"The paper (ViT-S, ImageNet100): {PAPER_NUMBERS}; accuracy rises with heads and rank, and "
            "falls for T >= 20 and for r <= 16. Ours, means over seeds:",
            "",
            *trend_lines(args, results),
            SECTION_END,
        ]
    )


def write_section(path: Path, text: str) -> None:
    """Replace the marked ablations section of ``path`` (or append it); nothing else changes."""
    old = path.read_text() if path.exists() else ""
    start, end = old.find(SECTION_START), old.find(SECTION_END)
    if start >= 0 and end > start:
        new = old[:start] + text + old[end + len(SECTION_END) :]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text + "\n"
    path.write_text(new)


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="The paper's ablations (heads, rank, T, A init), one factor at a time, on Fashion-MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--heads", type=int, nargs="+", default=[2, 8, 32], help="values of N")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="values of r")
    p.add_argument("--merge-every", type=int, nargs="+", default=[1, 5, 10, 20, 50], help="values of T")
    p.add_argument(
        "--a-inits", nargs="+", choices=A_INITS, default=["reference", "semi-orthogonal", "kaiming", "xavier"]
    )
    p.add_argument("--base-heads", type=int, default=32)
    p.add_argument("--base-rank", type=int, default=64)
    p.add_argument("--base-merge-every", type=int, default=10)
    p.add_argument("--base-a-init", choices=A_INITS, default="reference")
    p.add_argument("--scale", type=float, default=4.0, help="s = alpha / r in every LTE row")
    p.add_argument(
        "--lr-rule",
        choices=LR_RULES,
        default="constant",
        help="LTE lr across ranks: constant (--lr-lte) or inverse-rank (--lr-lte x base rank / r)",
    )
    p.add_argument("--steps", type=int, default=1000, help="steps of every run (a multiple of every T)")
    p.add_argument("--global-batch", type=int, default=256, help="samples per step, split over the N heads")
    p.add_argument(
        "--head-batch",
        type=int,
        default=8,
        help="the heads sweep again with this batch per head (samples grow with N); 0: skip",
    )
    p.add_argument("--lr-lte", type=float, default=1e-3, help="LTE lr (at the base rank for inverse-rank)")
    p.add_argument("--lr-full", type=float, default=1e-3, help="full training's lr")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--cache", type=Path, help="JSON lines of finished runs: reused, and appended to")
    p.add_argument("--out", type=Path, help="write the section into this Markdown file (e.g. BENCHMARKS.md)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = load_dataset("fashion-mnist", seed=0)
    results = load_cache(args.cache)
    # a cached run counts only if it trained this sweep's lr and alpha (--scale, --lr-rule may differ)
    todo = [(s, k) for k in args.seeds for s in settings(args) if not cached(results, args, s, k)]
    for i, (s, k) in enumerate(todo):
        record = run_one(args, s, k, data)
        results[record["key"]] = record
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            with args.cache.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        log(
            f"[{i + 1}/{len(todo)}] {s.key(k)}: acc {record['test_accuracy']:.4f} "
            f"lr {record['lr']:.3g} in {record['seconds']:.0f} s ({(time.perf_counter() - started) / 60:.1f} min)"
        )
    print("\n".join(table(args, results)))
    print()
    print("\n".join(trend_lines(args, results)))
    if args.out:
        shown = [a for a in argv if not a.startswith("--cache")]
        if "--cache" in argv:  # the cache is how the run was split, not part of the result
            i = argv.index("--cache")
            shown = argv[:i] + argv[i + 2 :]
        write_section(args.out, section(args, shown, results))
        log(f"ablations: wrote the section to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
