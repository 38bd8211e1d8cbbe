"""Convergence on Fashion-MNIST: full training vs LTE (base unquantised, int8, nf4).

For each model, full training runs on a budget of ``--samples`` (1.0x) and on ``--ratio`` times
that (1.3x), each with its own warm-up and cosine schedule; LTE runs the same two budgets. With
``--schedule shared`` each LTE configuration runs once, to 1.3x, and is evaluated at the round
where it has seen exactly the 1.0x samples: half the cost, but its 1.0x number is taken before
its cosine has finished, which favours full training at equal samples. Full training always
runs both budgets on their own schedules, so the baseline at 1.0x is a finished run.

Every delta is in accuracy points against full training at 1.0x; the targets of issue 2 are
LTE at 1.3x >= full at 1.0x - 0.5, and int8 within 0.5 point of the unquantised base.

Training is ``lte.commands.sim``'s ``run_full`` / ``run_lte``; this file only builds the jobs,
reads the histories and writes the table. Per-model values use ``model=value`` (a bare value
applies to every model); ``--lr-lte`` and ``--alpha`` take several values and sweep their grid::

    python bench/convergence.py --models mlp --samples 32000 --quants none --lr-lte 1e-4 3e-4 --alpha 4096 8192
    python bench/convergence.py --threads 1 --out BENCHMARKS.md   # the defaults: the published run
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mdsections import write_model_blocks

from lte.commands.sim import SimResult, run_full, run_lte
from lte.common.core.quant import QUANT_KINDS
from lte.common.data.datasets import Dataset, load_dataset
from lte.common.job.config import JobConfig

MODELS = ("mlp", "vit-tiny")
SCHEDULES = ("separate", "shared")
SECTION = "convergence"
SECTION_TITLE = "## Convergence: full training vs LTE on Fashion-MNIST"


# ---------------------------------------------------------------------------------------
# Options that may differ per model: ``V`` for all models, ``model=V`` for one


def per_model(kind: Callable[[str], Any]) -> Callable[[str], tuple[str, Any]]:
    """argparse type for one ``V`` or ``model=V`` item; ``*`` stands for every model."""

    def parse(text: str) -> tuple[str, Any]:
        model, sep, value = text.rpartition("=")
        try:
            return (model if sep else "*"), kind(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad value {text!r}: {e}") from e

    return parse


def schedule_kind(text: str) -> str:
    if text not in SCHEDULES:
        raise ValueError(f"choose one of {SCHEDULES}")
    return text


def values_for(items: list[tuple[str, Any]], model: str) -> list[Any]:
    """The values given for ``model``, else those given for every model."""
    own = [v for m, v in items if m == model]
    return own or [v for m, v in items if m == "*"]


def value_for(items: list[tuple[str, Any]], model: str, flag: str) -> Any:
    values = values_for(items, model)
    if len(values) != 1:
        raise SystemExit(f"convergence: {flag} needs exactly one value for {model}, got {values or 'none'}")
    return values[0]


# ---------------------------------------------------------------------------------------
# Runs


@dataclass
class Row:
    """One table row: a method on one model, over the seeds."""

    model: str
    method: str  # "full" or "lte"
    quant: str
    label: str  # what the row's method column shows
    samples: tuple[int, int] = (0, 0)
    acc_1: list[float] = field(default_factory=list)  # per seed
    acc_r: list[float] = field(default_factory=list)
    seconds: float = 0.0


def balanced_test_subset(dataset: Dataset, count: int) -> Dataset:
    """The first ``count / classes`` test images of every class (all of them when count is 0)."""
    if count <= 0 or count >= dataset.test_y.numel():
        return dataset
    per_class = count // dataset.num_classes
    keep = torch.cat(
        [torch.nonzero(dataset.test_y == c).squeeze(1)[:per_class] for c in range(dataset.num_classes)]
    )
    keep = keep.sort().values
    return dataclasses.replace(dataset, test_x=dataset.test_x[keep], test_y=dataset.test_y[keep])


def accuracy_at(result: SimResult, version: int) -> float:
    """Test accuracy recorded after merge (or step block) ``version``."""
    for record in result.history:
        if record["version"] == version and "test_accuracy" in record:
            return record["test_accuracy"]
    raise RuntimeError(f"no evaluation at round {version} in the history")


def budgets(samples: int, ratio: float, per_step: int, merge_every: int) -> tuple[int, int]:
    """Steps for the 1.0x and ratio-x budgets, both whole rounds of ``merge_every`` steps."""
    rounds = samples // (per_step * merge_every)
    if rounds < 1:
        raise SystemExit(
            f"convergence: --samples {samples} is under one round ({per_step * merge_every} samples = "
            "heads x batch size x merge-every)"
        )
    long_rounds = round(rounds * ratio)
    if abs(long_rounds - rounds * ratio) > 1e-9:
        log(f"convergence: {ratio:g}x of {rounds} rounds is not whole; the long run has {long_rounds} rounds")
    return rounds * merge_every, long_rounds * merge_every


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_model(args: argparse.Namespace, model: str, dataset: Dataset) -> list[Row]:
    merge_every = value_for(args.merge_every, model, "--merge-every")
    base = JobConfig(
        model=model,
        dataset="fashion-mnist",
        heads=args.heads,
        rank=value_for(args.rank, model, "--rank"),
        merge_every=merge_every,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        patch_size=args.patch_size if model.startswith("vit") else 0,
        image_size=args.image_size if model.startswith("vit") else 0,
    )
    samples = value_for(args.samples, model, "--samples")
    steps_1, steps_r = budgets(samples, args.ratio, base.heads * base.batch_size, merge_every)
    schedule = value_for(args.schedule, model, "--schedule")
    repeats = value_for(args.repeats, model, "--repeats")
    seeds = [args.seed + k for k in range(repeats)]
    data = balanced_test_subset(dataset, value_for(args.test_samples, model, "--test-samples"))

    rows: list[Row] = []
    full = Row(model, "full", "-", f"full lr {value_for(args.lr_full, model, '--lr-full'):g}")
    rows.append(full)
    lte_configs = [
        (quant, lr, alpha)
        for quant in args.quants
        for lr in values_for(args.lr_lte, model)
        for alpha in values_for(args.alpha, model)
    ]
    for quant, lr, alpha in lte_configs:
        label = f"LTE N={base.heads} r={base.rank} a={alpha:g} (s={alpha / base.rank:g}) lr {lr:g} T={merge_every}"
        rows.append(Row(model, "lte", quant, label))

    def job(steps: int, seed: int, lr: float, quant: str = "none", alpha: float = 64.0) -> JobConfig:
        return dataclasses.replace(
            base, steps=steps, seed=seed, lr=lr, quant=quant, alpha=alpha
        ).with_dataset(data)

    for seed in seeds:
        lr_full = value_for(args.lr_full, model, "--lr-full")
        short = run_full(job(steps_1, seed, lr_full), data, device=args.device)
        long = (
            short if steps_r == steps_1 else run_full(job(steps_r, seed, lr_full), data, device=args.device)
        )
        full.acc_1.append(short.test_accuracy)
        full.acc_r.append(long.test_accuracy)
        full.samples = (short.samples, long.samples)
        full.seconds += short.seconds + (long.seconds if long is not short else 0.0)
        log(
            f"{model} seed {seed} full lr {lr_full:g}: acc {full.acc_1[-1]:.4f} @1.0x, "
            f"{full.acc_r[-1]:.4f} @{args.ratio:g}x ({full.seconds:.0f} s so far)"
        )
        for row, (quant, lr, alpha) in zip(rows[1:], lte_configs, strict=True):
            if schedule == "shared":
                result = run_lte(
                    job(steps_r, seed, lr, quant, alpha),
                    data,
                    device=args.device,
                    eval_every=steps_1 // merge_every,
                )
                row.acc_1.append(accuracy_at(result, steps_1 // merge_every))
                row.acc_r.append(result.test_accuracy)
                row.samples = (result.samples * steps_1 // steps_r, result.samples)
                row.seconds += result.seconds
            else:
                short = run_lte(job(steps_1, seed, lr, quant, alpha), data, device=args.device)
                long = (
                    short
                    if steps_r == steps_1
                    else run_lte(job(steps_r, seed, lr, quant, alpha), data, device=args.device)
                )
                row.acc_1.append(short.test_accuracy)
                row.acc_r.append(long.test_accuracy)
                row.samples = (short.samples, long.samples)
                row.seconds += short.seconds + (long.seconds if long is not short else 0.0)
            log(
                f"{model} seed {seed} {row.label} quant {quant}: acc {row.acc_1[-1]:.4f} @1.0x, "
                f"{row.acc_r[-1]:.4f} @{args.ratio:g}x ({row.seconds:.0f} s so far)"
            )
    return rows


# ---------------------------------------------------------------------------------------
# The table


def mean_sd(values: list[float], scale: float = 100.0, signed: bool = False) -> str:
    mean = statistics.fmean(values) * scale
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) * scale:.2f}"
    return text


def paired(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def markdown_table(rows: list[Row], ratio: float) -> list[str]:
    lines = [
        f"| model | method | quant | samples 1.0x / {ratio:g}x | test acc @1.0x (%) | test acc @{ratio:g}x (%) "
        f"| Δ @1.0x | Δ @{ratio:g}x | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        full = next(r for r in rows if r.model == row.model and r.method == "full")
        lines.append(
            f"| {row.model} | {row.label} | {row.quant} | {row.samples[0]} / {row.samples[1]} "
            f"| {mean_sd(row.acc_1)} | {mean_sd(row.acc_r)} "
            f"| {mean_sd(paired(row.acc_1, full.acc_1), signed=True)} "
            f"| {mean_sd(paired(row.acc_r, full.acc_1), signed=True)} | {row.seconds:.0f} |"
        )
    return lines


def target_lines(rows: list[Row], ratio: float) -> list[str]:
    """The two acceptance checks, per model and LTE configuration (means over seeds)."""
    out = []
    for row in rows:
        if row.method != "lte":
            continue
        full = next(r for r in rows if r.model == row.model and r.method == "full")
        gap = statistics.fmean(paired(row.acc_r, full.acc_1)) * 100
        check = "met" if gap >= -0.5 else "NOT met"
        line = f"- {row.model}, {row.label}, {row.quant}: LTE @{ratio:g}x - full @1.0x = {gap:+.2f} points ({check})"
        unquantised = next(
            (r for r in rows if r.model == row.model and r.label == row.label and r.quant == "none"), None
        )
        if row.quant != "none" and unquantised is not None:
            q_gap = statistics.fmean(paired(row.acc_r, unquantised.acc_r)) * 100
            line += f"; vs unquantised @{ratio:g}x: {q_gap:+.2f} points"
            if row.quant == "int8":  # the issue sets a target for int8 only
                line += " (met)" if q_gap >= -0.5 else " (NOT met)"
        out.append(line)
    return out


def model_block(
    args: argparse.Namespace, argv: list[str], model: str, rows: list[Row], seconds: float
) -> list[str]:
    """One model's part of the section: command, table, settings, target checks."""
    command = shlex.join(["python", "bench/convergence.py", *argv])
    if value_for(args.schedule, model, "--schedule") == "separate":
        schedule = "every budget is its own run with its own warm-up and cosine decay"
    else:
        schedule = (
            f"full training runs each budget on its own schedule; each LTE configuration runs once to "
            f"{args.ratio:g}x and is evaluated at the 1.0x round, before its cosine has finished "
            "(pessimistic for LTE @1.0x)"
        )
    test_count = value_for(args.test_samples, model, "--test-samples")
    test_images = (
        f"a class-balanced subset of {test_count} of the 10000 test images"
        if test_count
        else "all 10000 test images"
    )
    shape = (
        f" vit-tiny: width 192, depth 12, 3 heads, {args.image_size}x{args.image_size} images, patch "
        f"{args.patch_size}."
        if model.startswith("vit")
        else ""
    )
    return [
        f"### {model}",
        "",
        f"Generated by `bench/convergence.py` ({seconds / 60:.1f} min for this command). Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        *markdown_table(rows, args.ratio),
        "",
        "Δ columns are accuracy points against full training at 1.0x samples"
        + (
            f" (paired by seed); ± is the standard deviation over {len(rows[0].acc_1)} seeds"
            if len(rows[0].acc_1) > 1
            else "; one seed"
        )
        + f". Schedule: {schedule}. Evaluated on "
        f"{test_images}. Full training sees the LTE heads' data streams stacked, {args.heads} x "
        f"{args.batch_size} samples per step; each LTE head sees {args.batch_size}. AdamW, 5% warm-up, "
        f"cosine to 0, weight decay {args.weight_decay:g}. Seconds: wall clock of the row's runs, "
        f"evaluations included, summed over seeds.{shape}",
        "",
        *target_lines(rows, args.ratio),
    ]


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fashion-MNIST convergence: full training vs LTE at equal and at 1.3x samples.",
        epilog="Per-model values (PM): 'V' for every model, or 'model=V' items, e.g. --samples mlp=51200 "
        "vit-tiny=3840. The defaults are the run published in BENCHMARKS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pm = {"nargs": "+"}
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run")
    p.add_argument(
        "--quants",
        nargs="*",
        choices=QUANT_KINDS,
        default=list(QUANT_KINDS),
        help="LTE bases; none: full only",
    )
    p.add_argument(
        "--samples",
        **pm,
        type=per_model(int),
        default=[("mlp", 51200), ("vit-tiny", 3840)],
        help="PM: 1.0x budget",
    )
    p.add_argument("--ratio", type=float, default=1.3, help="the longer budget, as a multiple of --samples")
    p.add_argument(
        "--schedule",
        **pm,
        type=per_model(schedule_kind),
        default=[("mlp", "separate"), ("vit-tiny", "shared")],
        help="PM: separate | shared (module docstring)",
    )
    p.add_argument("--heads", type=int, default=8, help="N, LoRA heads")
    p.add_argument(
        "--rank", **pm, type=per_model(int), default=[("mlp", 128), ("vit-tiny", 16)], help="PM: r"
    )
    p.add_argument(
        "--alpha",
        **pm,
        type=per_model(float),
        default=[("mlp", 8192.0), ("vit-tiny", 1024.0)],
        help="PM, swept",
    )
    p.add_argument(
        "--lr-full", **pm, type=per_model(float), default=[("*", 1e-3)], help="PM: full training's lr"
    )
    p.add_argument(
        "--lr-lte", **pm, type=per_model(float), default=[("mlp", 3e-4), ("vit-tiny", 2e-4)], help="PM, swept"
    )
    p.add_argument(
        "--merge-every", **pm, type=per_model(int), default=[("mlp", 10), ("vit-tiny", 3)], help="PM: T"
    )
    p.add_argument("--batch-size", type=int, default=16, help="samples per head per step")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--image-size", type=int, default=28, help="vit-tiny input side")
    p.add_argument("--patch-size", type=int, default=7, help="vit-tiny patch (28/7: 16 tokens)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument(
        "--warmup-steps", type=int, default=-1, help="warm-up steps of every run (-1: 5%% of its steps) [-1]"
    )
    p.add_argument(
        "--repeats", **pm, type=per_model(int), default=[("mlp", 2), ("vit-tiny", 1)], help="PM: seeds"
    )
    p.add_argument(
        "--test-samples",
        **pm,
        type=per_model(int),
        default=[("mlp", 0), ("vit-tiny", 2000)],
        help="PM: class-balanced test images to evaluate on (0: all 10000)",
    )
    p.add_argument("--data-dir", help="Fashion-MNIST IDX folder; None: /usr/share/datasets/fashion-mnist")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--out", type=Path, help="markdown file whose convergence section gets these models' blocks"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("fashion-mnist", args.data_dir)
    blocks = {}
    for model in args.models:
        started = time.perf_counter()
        rows = run_model(args, model, dataset)
        blocks[model] = model_block(args, argv, model, rows, time.perf_counter() - started)
        print("\n".join(blocks[model]) + "\n", flush=True)
    if args.out:
        write_model_blocks(args.out, SECTION, SECTION_TITLE, blocks, MODELS)
        log(f"wrote {', '.join(blocks)} into the convergence section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
