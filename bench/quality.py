"""Training quality: full training and LTE side by side on one zoo model, several seeds.

Each ``--run`` is one configuration: ``full`` or ``lte``, then ``key=value`` job fields
(``lr=3e-4``, ``rank=16``, ``alpha=256``, ``a_init_gain=2`` ...) and optionally ``x=1.3``, the
sample budget as a multiple of ``--steps`` (LTE's 1.3x of the paper). Every (run, seed) trains
with ``lte.commands.sim``'s ``run_full`` / ``run_lte`` (the code behind ``lte-sim``), appends one
JSON line to ``--results`` and is skipped when that file already holds it, so a sweep can be
split across processes, stopped and resumed. The table gives each run's mean test accuracy over
its seeds and its gap to the best full-training run (mean over the same seeds)::

    python bench/quality.py --model vit-micro --steps 300 --seeds 0 \\
        --run "full lr=1e-3" --run "lte rank=16 alpha=64 lr=1e-3 x=1.3" --results /tmp/q.jsonl
    python bench/quality.py --results /tmp/q.jsonl --table-only   # the table of what is in the file
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lte.commands.sim import run_full, run_lte
from lte.common.data.datasets import eval_subset, load_dataset
from lte.common.job.config import JobConfig

KINDS = ("full", "lte")
JOB_FIELDS = {f.name: f.type for f in dataclasses.fields(JobConfig)}


def parse_run(text: str) -> dict[str, Any]:
    """``"lte rank=16 lr=3e-4 x=1.3"`` -> ``{"kind": "lte", "x": 1.3, "job": {"rank": 16, "lr": 3e-4}}``."""
    words = text.split()
    if not words or words[0] not in KINDS:
        raise argparse.ArgumentTypeError(f"run {text!r} must start with one of {KINDS}")
    run: dict[str, Any] = {"kind": words[0], "x": 1.0, "job": {}}
    defaults = JobConfig()
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"run {text!r}: {word!r} is not key=value")
        if key == "x":
            run["x"] = float(value)
            continue
        if key not in JOB_FIELDS:
            raise argparse.ArgumentTypeError(f"run {text!r}: {key!r} is not a job field")
        kind = type(getattr(defaults, key))
        run["job"][key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return run


def run_label(run: dict[str, Any]) -> str:
    parts = [
        run["kind"],
        *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in run["job"].items()),
    ]
    if run["x"] != 1.0:
        parts.append(f"x={run['x']:g}")
    return " ".join(parts)


def load_results(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` (none if it does not exist). A line that is not a JSON object (one
    cut short when a run was stopped mid-write) is skipped with a warning: that run counts as not
    done, so a resumed sweep trains it again."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            record = exc
        if not isinstance(record, dict):
            print(f"quality: warning: {path} line {number} is not a JSON record; skipped", file=sys.stderr)
            continue
        records.append(record)
    return records


def run_job(base: dict[str, Any], run: dict[str, Any], seed: int) -> JobConfig:
    """The job of one (run, seed): ``base`` with the run's fields, its steps times ``x``
    (ConfigError, a ValueError, naming the field when the result is not a valid job)."""
    values = {**base, **run["job"], "seed": seed}
    values["steps"] = round(values["steps"] * run["x"])
    return JobConfig(**values)


def train_one(base: dict[str, Any], run: dict[str, Any], seed: int, dataset, device: str) -> dict[str, Any]:
    job = run_job(base, run, seed).with_dataset(dataset)
    trainer = run_full if run["kind"] == "full" else run_lte
    start = time.perf_counter()
    result = trainer(job, dataset, device=device)
    return {
        "label": run_label(run),
        "seed": seed,
        "model": job.model,
        "base_model": base["model"],  # the sweep's --model (a run may set its own model=)
        "dataset": job.dataset,
        "base_steps": base["steps"],
        "steps": job.steps,
        "samples": result.samples,
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(device),
        "precision": job.precision,
    }


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per label, the mean over seeds, the gap to the best full run.

    Classification: test accuracy in %, higher is better. Language models (no accuracy): the
    validation loss in nats per token, lower is better, so a negative gap means LTE is ahead.
    """
    by_label: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["label"], {})[r["seed"]] = r
    lm = bool(records) and all(r.get("test_accuracy") is None for r in records)
    key, unit, factor = ("test_loss", "", 1.0) if lm else ("test_accuracy", " %", 100.0)
    better = min if lm else max
    means = {label: statistics.mean(r[key] for r in runs.values()) for label, runs in by_label.items()}
    full = [label for label in by_label if label.split()[0] == "full"]
    best_full = better(full, key=lambda label: means[label]) if full else None
    measure = "validation loss (mean)" if lm else "test accuracy (mean)"
    lines = [
        f"| run | steps | seeds | {measure} | per seed | gap to best full | minutes per run |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    digits = 4 if lm else 2
    for label in sorted(by_label, key=lambda label: (label.split()[0] != "full", label)):
        runs = by_label[label]
        seeds = sorted(runs)
        per_seed = ", ".join(f"{factor * runs[s][key]:.{digits}f}" for s in seeds)
        common = [s for s in seeds if best_full is not None and s in by_label[best_full]]
        if common:
            ref = statistics.mean(by_label[best_full][s][key] for s in common)
            mine = statistics.mean(runs[s][key] for s in common)
            gap = f"{factor * (mine - ref):+.{digits}f}"
        else:
            gap = "-"
        minutes = statistics.mean(r["seconds"] for r in runs.values()) / 60
        steps = runs[seeds[0]]["steps"]
        mark = " (best full)" if label == best_full else ""
        lines.append(
            f"| `{label}`{mark} | {steps} | {' '.join(map(str, seeds))} | {factor * means[label]:.{digits}f}{unit} "
            f"| {per_seed} | {gap} | {minutes:.1f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit-micro")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--steps", type=int, default=1500, help="steps of the 1.0x budget [1500]")
    p.add_argument("--heads", type=int, default=8, help="N; full training's batch is N x batch-size [8]")
    p.add_argument("--batch-size", type=int, default=16, help="samples per head per step [16]")
    p.add_argument("--merge-every", type=int, default=10, help="T [10]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--run", type=parse_run, action="append", default=[], help="one configuration (repeatable)"
    )
    p.add_argument("--results", type=Path, required=True, help="JSON lines: read, skipped, appended")
    p.add_argument("--table-only", action="store_true", help="print the table of --results and stop")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        help="test on a fixed class-balanced subset of K test images, as lte-server's option (0: all) [0];"
        " a result is only compared and skipped with results of the same K",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16", "auto"),
        help="autocast of every run; fp32 keeps GPU runs comparable with the CPU tables [fp32]",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.table_only:
        torch.set_num_threads(args.threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        base = dict(
            model=args.model,
            dataset=args.dataset,
            steps=args.steps,
            heads=args.heads,
            batch_size=args.batch_size,
            merge_every=args.merge_every,
            precision=args.precision,
        )
        try:
            for run in args.run:  # an invalid job stops the sweep before anything trains
                try:
                    run_job(base, run, args.seeds[0])
                except ValueError as exc:
                    raise ValueError(f"--run {run_label(run)!r}: {exc}") from None
            dataset = eval_subset(load_dataset(args.dataset, args.data_dir, seed=0), args.eval_samples, 0)
            args.results.parent.mkdir(parents=True, exist_ok=True)  # README's runs/q.jsonl on a fresh clone
        except (ValueError, FileNotFoundError, OSError) as exc:
            print(f"quality: error: {exc}", file=sys.stderr)
            return 2
        for run in args.run:
            for seed in args.seeds:
                done = {
                    (r["label"], r["seed"], r["base_steps"], r.get("base_model", r["model"]))
                    for r in load_results(args.results)
                    if r.get("eval_samples", 0) == args.eval_samples
                }
                if (run_label(run), seed, args.steps, args.model) in done:
                    continue
                record = {
                    **train_one(base, run, seed, dataset, args.device),
                    "eval_samples": args.eval_samples,
                }
                with args.results.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                score = (
                    f"validation loss {record['test_loss']:.4f}"
                    if record["test_accuracy"] is None
                    else f"{100 * record['test_accuracy']:.2f} %"
                )
                print(f"{record['label']} seed {seed}: {score} in {record['seconds']:.0f} s", flush=True)
    records = [
        r
        for r in load_results(args.results)
        if r.get("base_model", r["model"]) == args.model
        and r["base_steps"] == args.steps
        and r.get("eval_samples", 0) == args.eval_samples
    ]
    dataset_name = records[0]["dataset"] if records else args.dataset
    print(f"\n{args.model} on {dataset_name}, {args.steps} steps at 1.0x (results: {args.results})\n")
    print(table(records))
    print(f"\ncommand: python bench/quality.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
