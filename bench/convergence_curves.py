"""Convergence curves on Fashion-MNIST: test accuracy against samples and against bytes on the wire.

Four methods on the same model, data streams and sample budget, for a deployment of ``W`` workers
(``--workers``, default 2) sharing ``N`` heads:

- **full**: standard training (``run_full``), as W-way data-parallel training (DDP) would run it;
- **LTE sync**: the single-process emulator (``run_lte``, the server's merge code);
- **LTE async**: a real parameter server (``Coordinator`` + ``ParameterServer`` on loopback, as in
  ``tests/cluster.py``) with ``W`` real ``lte-worker`` processes, ``--mode async``;
- **DiLoCo-style**: ``run_diloco``, W full replicas with their own AdamW averaged every H = T steps.

Bytes on the wire, all workers together, each byte counted once:

- LTE async: what the server counted (tensor payload bytes of every push and pull) at each version;
- LTE sync: the same counters from a real sync-mode server running the *same job* for the first
  ``--byte-rounds`` rounds (then stopped); later rounds are charged the last measured round's bytes;
- full (DDP, arithmetic): a ring all-reduce sends ``2 (W - 1) / W x 4 x P`` bytes per worker and step
  (P trainable parameters, fp32 gradients), so ``2 (W - 1) x 4 P`` per step in all;
- DiLoCo (arithmetic): each worker sends and receives the whole fp32 model per sync, ``2 W x 4 P``.

Curves are kept as JSON under ``runs/`` (``--replot`` redraws them without training); plots go to
``docs/convergence-<model>.png``; ``--out BENCHMARKS.md`` writes the ``convergence-curves`` section::

    python bench/convergence_curves.py --models mlp --threads 1 --out BENCHMARKS.md
    python bench/convergence_curves.py --models vit-tiny --threads 1 --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from convergence import balanced_test_subset
from mdsections import write_model_blocks

from lte.commands.sim import run_diloco, run_full, run_lte
from lte.common.data.datasets import Dataset, load_dataset
from lte.common.job.config import JobConfig
from lte.common.job.trainer import build_job_model

MODELS = ("mlp", "vit-tiny")
METHODS = ("full", "lte-sync", "lte-async", "diloco")
LABELS = {
    "full": "full training (DDP bytes)",
    "lte-sync": "LTE sync (emulator)",
    "lte-async": "LTE async (real server)",
    "diloco": "DiLoCo-style, H = T",
}
COLORS = {"full": "black", "lte-sync": "tab:blue", "lte-async": "tab:orange", "diloco": "tab:green"}
SECTION = "convergence-curves"
SECTION_TITLE = "## Convergence curves: accuracy against samples and bytes (issue 6, item 5)"

# The tuned settings of BENCHMARKS.md's convergence notes, per model.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(
        samples=51200, rank=128, alpha=8192.0, lr_lte=3e-4, merge_every=10, eval_every=2, test_samples=0
    ),
    "vit-tiny": dict(
        samples=3840, rank=16, alpha=1024.0, lr_lte=2e-4, merge_every=3, eval_every=2, test_samples=2000
    ),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def setting(args: argparse.Namespace, model: str, name: str) -> Any:
    value = getattr(args, name)
    return DEFAULTS[model][name] if value is None else value


def make_job(args: argparse.Namespace, model: str, data: Dataset, **overrides: Any) -> JobConfig:
    per_step = args.heads * args.batch_size
    merge_every = setting(args, model, "merge_every")
    rounds = setting(args, model, "samples") // (per_step * merge_every)
    if rounds < 1:
        raise SystemExit(f"convergence_curves: {model}: the budget is under one round")
    values = dict(
        model=model,
        dataset="fashion-mnist",
        heads=args.heads,
        rank=setting(args, model, "rank"),
        alpha=setting(args, model, "alpha"),
        merge_every=merge_every,
        lr=setting(args, model, "lr_lte"),
        steps=rounds * merge_every,
        batch_size=args.batch_size,
        quant=args.quant,
        seed=args.seed,
        warmup_steps=args.warmup_steps,
        image_size=args.image_size if model.startswith("vit") else 0,
        patch_size=args.patch_size if model.startswith("vit") else 0,
    )
    values.update(overrides)
    return JobConfig(**values).with_dataset(data)


# ---------------------------------------------------------------------------------------
# The real server


def run_cluster(
    job: JobConfig, data: Dataset, workers: int, eval_every: int, stop_after: int | None, log_dir: Path
) -> dict[str, Any]:
    """A real ParameterServer on 127.0.0.1 with ``workers`` lte-worker processes.

    Runs the job to its end, or stops it after version ``stop_after``. Returns the server's
    per-version history (cumulative bytes) and its evaluations.
    """
    from lte.server.coordinator import Coordinator
    from lte.server.grpc_server import ParameterServer

    log_dir.mkdir(parents=True, exist_ok=True)
    coordinator = Coordinator(
        job,
        data,
        heads_per_worker=-(-job.heads // workers),
        eval_every=eval_every,
        lease_timeout_s=120.0,
        metrics_path=log_dir / "metrics.jsonl",
    )
    server = ParameterServer(coordinator, host="127.0.0.1", port=0).start()
    started = time.perf_counter()
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        for i in range(workers):
            with open(log_dir / f"worker-{i}.log", "w") as fh:
                cmd = [sys.executable, "-m", "lte.worker.cli", "--server", server.address]
                cmd += ["--device", "cpu", "--threads", "1", "--name", f"bench-{i}", "--quiet"]
                procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env))
        with coordinator.changed:
            while not coordinator.done and not (stop_after and coordinator.version >= stop_after):
                coordinator.changed.wait(timeout=1.0)
                if all(p.poll() is not None for p in procs):
                    raise RuntimeError(f"every worker exited early; see {log_dir}/worker-*.log")
        seconds = time.perf_counter() - started
        final = None if stop_after else coordinator.evaluate_now()
        with coordinator.lock:
            history = [dict(r) for r in coordinator.history]
            evals = [dict(r) for r in coordinator.evals]
            refused = coordinator.pushes_refused
            stale = [p["staleness"] for p in coordinator.push_log]
        if not stop_after:
            deadline = time.monotonic() + 10
            for p in procs:  # they leave on their next pull once the job is done
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        server.stop(grace=0.5)
    return {
        "history": history,
        "evals": evals,
        "final": final,
        "seconds": seconds,
        "pushes_refused": refused,
        "mean_staleness": sum(stale) / len(stale) if stale else 0.0,
    }


def bytes_at(history: list[dict[str, Any]], version: int) -> int:
    """Cumulative up + down bytes at ``version`` in a server history (the last record before it)."""
    best = 0
    for r in history:
        if r["version"] <= version:
            best = r["bytes_up"] + r["bytes_down"]
    return best


# ---------------------------------------------------------------------------------------
# One model


def run_model(args: argparse.Namespace, model: str, dataset: Dataset) -> dict[str, Any]:
    data = balanced_test_subset(dataset, setting(args, model, "test_samples"))
    lte_job = make_job(args, model, data)
    full_job = dataclasses.replace(lte_job, lr=args.lr_full)
    eval_every = setting(args, model, "eval_every")
    workers = args.workers
    params = sum(p.numel() for p in build_job_model(lte_job).parameters())
    T = lte_job.merge_every
    per_step = lte_job.heads * lte_job.batch_size
    curves: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    notes: dict[str, Any] = {}
    run_dir = Path(args.run_dir) / model

    # full training: DDP ring all-reduce bytes, arithmetic
    ddp_per_step = 2 * (workers - 1) * 4 * params
    log(f"{model}: full training, {full_job.steps} steps of {per_step} samples")
    result = run_full(full_job, data, device=args.device, eval_every=eval_every)
    curves["full"] = [
        {"samples": r["samples"], "bytes": r["version"] * T * ddp_per_step, "acc": r["test_accuracy"]}
        for r in result.history
        if "test_accuracy" in r
    ]
    seconds["full"] = result.seconds

    # DiLoCo-style: W replicas, whole fp32 model up and down per worker and sync, arithmetic
    log(f"{model}: DiLoCo-style, {workers} replicas, H = {T}")
    result = run_diloco(
        full_job, data, workers=workers, sync_every=T, device=args.device, eval_every=eval_every
    )
    diloco_per_sync = 2 * workers * 4 * params
    curves["diloco"] = [
        {"samples": r["samples"], "bytes": r["version"] * diloco_per_sync, "acc": r["test_accuracy"]}
        for r in result.history
        if "test_accuracy" in r
    ]
    seconds["diloco"] = result.seconds

    # LTE sync bytes: the same job on a real sync server, first rounds only
    log(f"{model}: LTE sync bytes from a real sync server, {args.byte_rounds} rounds")
    measured = run_cluster(
        dataclasses.replace(lte_job, mode="sync"), data, workers, 0, args.byte_rounds, run_dir / "sync-bytes"
    )
    sync_hist = measured["history"]
    k = min(len(sync_hist), args.byte_rounds)
    per_round = bytes_at(sync_hist, k) - bytes_at(sync_hist, k - 1)
    notes["sync_bytes_rounds"] = [
        {"version": r["version"], "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"]} for r in sync_hist
    ]
    notes["sync_bytes_per_round"] = per_round

    def sync_bytes(version: int) -> int:
        return (
            bytes_at(sync_hist, version)
            if version <= k
            else bytes_at(sync_hist, k) + (version - k) * per_round
        )

    log(f"{model}: LTE sync (emulator), {lte_job.rounds} rounds")
    result = run_lte(lte_job, data, workers=workers, device=args.device, eval_every=eval_every)
    curves["lte-sync"] = [
        {"samples": r["samples"], "bytes": sync_bytes(r["version"]), "acc": r["test_accuracy"]}
        for r in result.history
        if "test_accuracy" in r
    ]
    seconds["lte-sync"] = result.seconds

    # LTE async: the real server, to the end
    log(f"{model}: LTE async (real server, {workers} worker processes)")
    async_job = dataclasses.replace(lte_job, mode="async")
    heads_per_push = -(-lte_job.heads // workers)
    versions_per_round = lte_job.heads // heads_per_push
    out = run_cluster(async_job, data, workers, eval_every * versions_per_round, None, run_dir / "async")
    points = {e["version"]: e for e in out["evals"]}
    if out["final"]:
        points[out["final"]["version"]] = out["final"]
    curves["lte-async"] = [
        {"samples": e["samples"], "bytes": bytes_at(out["history"], v), "acc": e["test_accuracy"]}
        for v, e in sorted(points.items())
        if "test_accuracy" in e
    ]
    seconds["lte-async"] = out["seconds"]
    notes["async_mean_staleness"] = out["mean_staleness"]
    notes["async_pushes_refused"] = out["pushes_refused"]

    return {
        "model": model,
        "job": lte_job.to_dict(),
        "lr_full": args.lr_full,
        "workers": workers,
        "params": params,
        "test_images": int(data.test_y.numel()),
        "curves": curves,
        "seconds": seconds,
        "notes": notes,
        "date": time.strftime("%a %b %d %Y", time.gmtime()),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads,
    }


# ---------------------------------------------------------------------------------------
# Plot and table


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    job = record["job"]
    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        points = record["curves"].get(method)
        if not points:
            continue
        xs = [p["samples"] for p in points]
        bs = [p["bytes"] for p in points]
        ys = [100 * p["acc"] for p in points]
        style = dict(color=COLORS[method], marker="o", markersize=3, linewidth=1.5, label=LABELS[method])
        ax_s.plot(xs, ys, **style)
        ax_b.plot([b / 1e6 for b in bs], ys, **style)
    ax_s.set_xlabel("training samples")
    ax_b.set_xlabel("MB on the wire, all workers (log scale)")
    ax_b.set_xscale("log")
    ax_b.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_b.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_b.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in (ax_s, ax_b):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    ax_s.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"Fashion-MNIST {record['model']}: N={job['heads']} r={job['rank']} s={job['alpha'] / job['rank']:g} "
        f"T={job['merge_every']} base {job['quant']}, {record['workers']} workers, "
        f"{record['test_images']} test images",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def model_block(record: dict[str, Any], command: str, png: str) -> list[str]:
    job = record["job"]
    curves = record["curves"]
    ddp_bytes = curves["full"][-1]["bytes"]
    lines = [
        f"### {record['model']}",
        "",
        f"![accuracy against samples and bytes, {record['model']}]({png})",
        "",
        f"Generated by `bench/convergence_curves.py` on {record['date']} (UTC), {record['machine']}, "
        f"torch {record['torch']}, `--threads {record['threads']}`. Reproduce with:",
        "",
        "```",
        command,
        "```",
        "",
        "| method | samples | final test acc (%) | bytes on the wire, MB | bytes / sample | bytes vs DDP | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        last = curves[method][-1]
        lines.append(
            f"| {LABELS[method]} | {last['samples']} | {100 * last['acc']:.2f} | {mb(last['bytes'])} "
            f"| {last['bytes'] / last['samples']:,.0f} | {last['bytes'] / ddp_bytes:.3f} "
            f"| {record['seconds'][method]:.0f} |"
        )
    notes = record["notes"]
    rounds = notes["sync_bytes_rounds"]
    first = ", ".join(f"v{r['version']}: up {mb(r['bytes_up'])} / down {mb(r['bytes_down'])}" for r in rounds)
    lines += [
        "",
        f"Job: {job['model']}, N = {job['heads']} heads of {job['batch_size']} samples per step, r = {job['rank']}, "
        f"alpha = {job['alpha']:g} (s = {job['alpha'] / job['rank']:g}), T = {job['merge_every']}, LTE lr "
        f"{job['lr']:g}, full / DiLoCo lr {record['lr_full']:g}, {job['steps']} steps, base {job['quant']} "
        f"(snapshot codec int8-row + zstd when int8), uplink {job['uplink']} + zstd, AdamW, {job['warmup_steps']} warm-up "
        f"step(s), cosine to 0, seed {job['seed']}; {record['params']:,} trainable parameters; {record['workers']} workers, "
        f"{record['test_images']} test images"
        + (" (class-balanced subset)" if record["test_images"] < 10000 else "")
        + ". Seconds: wall clock of the run, evaluations included.",
        f"- LTE sync bytes: a real sync server ran the same job for its first {len(rounds)} rounds "
        f"(cumulative counters {first} MB); every later round is charged the last measured round, "
        f"{mb(notes['sync_bytes_per_round'])} MB.",
        f"- LTE async: {record['workers']} `lte-worker` processes on loopback; pushes had mean staleness "
        f"{notes['async_mean_staleness']:.2f} versions (weight 1 / sqrt(1 + staleness)), "
        f"{notes['async_pushes_refused']} refused.",
        f"- DDP and DiLoCo bytes are arithmetic: {record['workers']} x 2 (W - 1) / W x 4 B x "
        f"{record['params']:,} per step, and 2 W x 4 B x {record['params']:,} per sync of H = "
        f"{job['merge_every']} steps.",
    ]
    return lines


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Fashion-MNIST accuracy against samples and bytes: full, LTE sync, LTE async, DiLoCo-style.",
        epilog="Per-model defaults (None below): "
        + "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for m, d in DEFAULTS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--samples", type=int, help="samples per run (whole rounds)")
    p.add_argument("--heads", type=int, default=8, help="N")
    p.add_argument("--rank", type=int, help="r")
    p.add_argument("--alpha", type=float, help="LoRA alpha")
    p.add_argument("--lr-lte", type=float, help="LTE lr")
    p.add_argument("--lr-full", type=float, default=1e-3, help="full training's and DiLoCo's lr")
    p.add_argument("--merge-every", type=int, help="T (and DiLoCo's H)")
    p.add_argument("--eval-every", type=int, help="evaluate every K rounds (async: K x versions per round)")
    p.add_argument("--test-samples", type=int, help="class-balanced test subset, 0 for all 10000")
    p.add_argument("--batch-size", type=int, default=16, help="samples per head per step")
    p.add_argument("--quant", default="int8", choices=("none", "int8", "nf4"), help="LTE worker base")
    p.add_argument("--workers", type=int, default=2, help="W: worker processes (DDP/DiLoCo replicas)")
    p.add_argument("--byte-rounds", type=int, default=3, help="rounds of the real sync server for bytes")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--warmup-steps", type=int, default=-1, help="linear warm-up steps, -1: 5%% of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device of the emulated runs")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of this process")
    p.add_argument("--run-dir", default="runs/convergence-curves", help="curves (JSON) and server logs")
    p.add_argument("--docs", default="docs", help="folder of the PNG plots")
    p.add_argument("--replot", action="store_true", help="redraw from the JSON of an earlier run")
    p.add_argument("--out", type=Path, help="write the section into this Markdown file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench/convergence_curves.py", *[a for a in argv if a != "--replot"]])
    dataset = None
    blocks = {}
    for model in args.models:
        json_path = Path(args.run_dir) / f"{model}.json"
        if args.replot:
            record = json.loads(json_path.read_text())
        else:
            dataset = dataset or load_dataset("fashion-mnist", seed=args.seed)
            record = run_model(args, model, dataset)
            record["command"] = command
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(record, indent=1))
        png = Path(args.docs) / f"convergence-{model}.png"
        plot(record, png)
        log(f"{model}: plot {png}")
        block = model_block(record, record.get("command", command), png.as_posix())
        print("\n".join(block[2:]) + "\n")
        blocks[model] = block
    if args.out:
        write_model_blocks(args.out, SECTION, SECTION_TITLE, blocks, MODELS)
        log(f"convergence_curves: wrote the section to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
