"""``lte-sim``: the single-process LTE emulator (and the full-training baseline).

The emulator is the parameter server and its workers in one process, on the server's code path:
each simulated worker is a ``LocalTrainer`` over its heads that loads the server's snapshot
(``lte.server.snapshots``) as a worker decodes it, and every merge is the server's
``Aggregator`` (``lte.server.aggregation``) over plain master weights; the export is the server's
too (``lte.common.job.export``). With ``--workers 1`` (the default) all ``N`` heads are one vectorised
model. It imports the server, so it is a command, above ``common``, ``server`` and ``worker``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lte.common.core.outputs import forward_logits
from lte.common.core.policy import classify_model
from lte.common.data.datasets import (
    DATASET_NAMES,
    eval_subset,
    head_batches,
    load_job_dataset,
    stacked_batch,
)
from lte.common.data.images import BadImageError
from lte.common.job.checks import ConfigError, OneLineArgumentParser, check_range, one_line_errors
from lte.common.job.config import (
    EXPLAIN_HELP,
    SERVER_TYPES,
    JobConfig,
    add_job_arguments,
    check_job,
    check_job_data,
    load_toml,
    resolve_job,
)
from lte.common.job.export import export_model
from lte.common.job.model_check import startup_model_check
from lte.common.job.precision import MixedPrecision
from lte.common.job.progress import Progress
from lte.common.job.trainer import (
    LocalTrainer,
    build_job_model,
    evaluate,
    loss_fn,
    lr_at,
    make_optimizer,
)
from lte.common.wire.protocol import snapshot_weights
from lte.server.aggregation import AcceptedPush, Aggregator
from lte.server.snapshots import SnapshotBuilder, master_for_snapshot


def partition_heads(total: int, workers: int) -> list[list[int]]:
    """Contiguous blocks of head ids, as the server leases them to equal workers."""
    if not 1 <= workers <= total:
        raise ValueError(f"workers must be in [1, heads={total}], got {workers}")
    base, extra = divmod(total, workers)
    out, start = [], 0
    for w in range(workers):
        size = base + (1 if w < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


@dataclass
class SimResult:
    mode: str
    test_accuracy: float | None
    test_loss: float
    samples: int
    steps: int
    rounds: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    master: dict[str, torch.Tensor] = field(default_factory=dict)  # the final weights (every run sets them)

    def summary(self) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        return {
            "mode": self.mode,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            **{k: final[k] for k in ("perplexity", "bits_per_byte") if k in final},  # language models
            "samples": self.samples,
            "steps": self.steps,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
        }


class _Recorder:
    """Per-round records (evaluated every K rounds and at the last), progress, and the result."""

    def __init__(
        self, mode: str, dataset, device: str, eval_every: int, last_round: int, progress, heads: int = 1
    ) -> None:
        self.mode, self.dataset, self.device, self.heads = mode, dataset, device, heads
        self.eval_every, self.last_round, self.progress = eval_every, last_round, progress
        self.history: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def round(self, version: int, samples: int, train_loss: float, model: torch.nn.Module) -> None:
        record: dict[str, Any] = {"version": version, "samples": samples, "train_loss": train_loss}
        if version == self.last_round or (self.eval_every and version % self.eval_every == 0):
            record.update(evaluate(model, self.dataset, device=self.device))
        self.history.append(record)
        if self.progress:
            # head-rounds, the unit of lte-server's progress: every head trains every round here
            self.progress.update(version * self.heads, **_progress_fields(record, samples, self.start))

    def result(self, steps: int, state: dict[str, torch.Tensor]) -> SimResult:
        final = self.history[-1]
        return SimResult(
            self.mode, final.get("test_accuracy"), final["test_loss"], final["samples"], steps,
            final["version"], time.perf_counter() - self.start, self.history, state,
        )  # fmt: skip


def run_lte(
    job: JobConfig,
    dataset,
    *,
    workers: int = 1,
    device: str = "cpu",
    eval_every: int = 0,
    progress: Progress | None = None,
) -> SimResult:
    """Sync-mode LTE: every round, each worker trains T steps, then all heads merge at once.

    The server's path without the network: each round's snapshot is built by the server's
    ``SnapshotBuilder`` (the coordinator's copy rule, ``master_for_snapshot``) and decoded as a worker
    decodes a pull (``snapshot_weights``); each simulated worker's update is an ``AcceptedPush`` of the
    server's ``Aggregator``, which merges the round in head order (``apply_updates``) with the weights
    the server gives it. Only the uplink codec is skipped: factors merge as trained (an fp32 uplink).
    """
    recorder = _Recorder("lte", dataset, device, eval_every, job.rounds, progress, job.heads)
    plain = build_job_model(job).to(device)
    master = plain.state_dict(keep_vars=False)  # the plain model's tensors: eval reads them directly
    policy = classify_model(plain, embeddings=job.embedding_heads)
    trainers = [LocalTrainer(job, ids, dataset, device=device) for ids in partition_heads(job.heads, workers)]
    snapshots = SnapshotBuilder(job, policy.head_names, delta_history=0)
    aggregator = Aggregator(job, master, max_staleness=0, buffer_size=0)
    samples, version = 0, 0

    def version_now() -> int:
        return version

    def copy_master() -> tuple[int, dict[str, torch.Tensor]]:  # the coordinator's copy rule
        return version, master_for_snapshot(master, policy.head_names, policy.ties)

    for version in range(job.rounds):
        _, messages, _ = snapshots.get(version_now, copy_master)
        snapshot = snapshot_weights(messages, job.torch_dtype)
        stats = []
        for i, t in enumerate(trainers):
            t.load_snapshot(snapshot)
            s = t.train_round()
            stats.append(s)
            heads, replica = t.export_update()
            push = AcceptedPush(f"sim-{i}", heads, aggregator.weight(0, version, version), replica, s.steps,
                                s.samples, s.train_loss)  # fmt: skip
            aggregator.add(push)
        aggregator.merge()
        for t in trainers:
            t.commit()
        samples += sum(s.samples for s in stats)
        loss = sum(s.train_loss * s.samples for s in stats) / sum(s.samples for s in stats)
        recorder.round(version + 1, samples, loss, plain)
    return recorder.result(job.steps, master)


def _full_step(
    model,
    optimizer,
    streams,
    step: int,
    job: JobConfig,
    task: str,
    device: str,
    mp: MixedPrecision | None = None,
) -> tuple[float, int]:
    """One AdamW step of a full model on the stacked batches of ``streams``: (loss, samples).
    ``mp``: the precision of the step (None: the job's on ``device``)."""
    mp = mp or MixedPrecision(job.precision, device)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, job)
    x, y = stacked_batch(streams, step)
    x = x.to(device, job.torch_dtype) if x.is_floating_point() else x.to(device)
    with mp.autocast():
        loss = loss_fn(task, forward_logits(model, x), y.to(device))
    optimizer.zero_grad(set_to_none=True)
    mp.step(loss, optimizer)
    return loss.item(), x.shape[0]


def run_full(
    job: JobConfig, dataset, *, device: str = "cpu", eval_every: int = 0, progress: Progress | None = None
) -> SimResult:
    """Standard training of the same model on the same samples (all N heads' batches per step)."""
    recorder = _Recorder("full", dataset, device, eval_every, job.rounds, progress, job.heads)
    model = build_job_model(job).to(device)
    model.train()
    optimizer = make_optimizer(model.parameters(), job)
    streams = [
        head_batches(dataset, h, job.heads, job.batch_size, job.seed, job.context, job.head_data)
        for h in range(job.heads)
    ]
    steps = job.steps
    samples, losses = 0, []
    mp = MixedPrecision(job.precision, device)
    for step in range(steps):
        loss, n = _full_step(model, optimizer, streams, step, job, dataset.task, device, mp)
        losses.append(loss)
        samples += n
        if (step + 1) % job.merge_every == 0 or step + 1 == steps:  # the same clock as LTE rounds
            recorder.round(-(-(step + 1) // job.merge_every), samples, sum(losses) / len(losses), model)
            losses = []
    return recorder.result(steps, model.state_dict())


def run_diloco(
    job: JobConfig,
    dataset,
    *,
    workers: int = 4,
    sync_every: int | None = None,
    device: str = "cpu",
    eval_every: int = 0,
    progress: Progress | None = None,
) -> SimResult:
    """The DiLoCo-style baseline: ``workers`` full replicas, each with its own AdamW, train
    ``sync_every`` (H, default T) steps on their heads' shards, then their weights are averaged.

    Every replica sees the batches of its block of heads, so the samples per step equal LTE's and
    full training's. Per sync each replica sends and receives the whole fp32 model.
    """
    sync_every = sync_every or job.merge_every
    steps = job.steps
    recorder = _Recorder("diloco", dataset, device, eval_every, -(-steps // sync_every), progress, job.heads)
    master = build_job_model(job).to(device)
    blocks = partition_heads(job.heads, workers)
    replicas = [build_job_model(job).to(device) for _ in blocks]
    for r in replicas:
        r.load_state_dict(master.state_dict())
        r.train()
    optimizers = [make_optimizer(r.parameters(), job) for r in replicas]
    streams = [
        [
            head_batches(dataset, h, job.heads, job.batch_size, job.seed, job.context, job.head_data)
            for h in ids
        ]
        for ids in blocks
    ]
    samples, losses, syncs = 0, [], 0
    mps = [MixedPrecision(job.precision, device) for _ in replicas]  # one loss scale per replica
    for step in range(steps):
        for model, opt, heads, mp in zip(replicas, optimizers, streams, mps, strict=True):
            loss, n = _full_step(model, opt, heads, step, job, dataset.task, device, mp)
            losses.append(loss)
            samples += n
        if (step + 1) % sync_every == 0 or step + 1 == steps:
            syncs += 1
            with torch.no_grad():
                states = [r.state_dict() for r in replicas]
                for name, value in master.state_dict().items():
                    value.copy_(torch.stack([s[name] for s in states]).mean(dim=0))
                for r in replicas:
                    r.load_state_dict(master.state_dict())
            recorder.round(syncs, samples, sum(losses) / len(losses), master)
            losses = []
    return recorder.result(steps, master.state_dict())


def _progress_fields(record: dict[str, Any], samples: int, start: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "loss": record["train_loss"],
        "samples/s": samples / max(1e-9, time.perf_counter() - start),
    }
    if "test_accuracy" in record:
        out["acc"] = record["test_accuracy"]
    if "perplexity" in record:
        out["val_loss"] = record["test_loss"]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="lte-sim",
        description="Train a model from scratch with LoRA-the-Explorer in one process (or, with\n"
        "--full, with standard training on the same samples).",
        epilog="example:\n  lte-sim --model mlp --dataset digits --heads 8 --rank 16 \\\n"
        "      --merge-every 10 --steps 400 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(parser)
    parser.add_argument("--config", help="TOML file with any job flag (flags given here win)")
    parser.add_argument("--data-dir", help="dataset folder (fashion-mnist IDX files, imagefolder root)")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip (and count) image files that do not decode instead of stopping",
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        help="evaluate on a fixed class-balanced subset of K test samples, 0 for all [0]",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="simulated workers; heads split in contiguous blocks [1]"
    )
    parser.add_argument(
        "--full", action="store_true", help="standard full training of the same model instead of LTE"
    )
    parser.add_argument(
        "--diloco",
        action="store_true",
        help="baseline: --workers full replicas averaged every --merge-every steps",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda:0 [cpu]")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every K merges (0: only at the end)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--export",
        help="write the trained model here as a plain safetensors state dict (tokenizer beside it)",
    )
    parser.add_argument("--json", action="store_true", help="print one final JSON line with the results")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--explain-model", action="store_true", help=EXPLAIN_HELP)
    return parser


def check_sim_args(args: argparse.Namespace, job: JobConfig) -> None:
    """lte-sim's own flags, and what the emulator cannot do. Raises ConfigError naming the option."""
    if job.mode != "sync":
        raise ConfigError(
            f"--mode {job.mode}: lte-sim emulates sync aggregation only; run {job.mode} aggregation on "
            f"lte-server (e.g. {shlex.join(['lte-server', '--mode', job.mode, '--local-workers', '2'])})"
        )
    if args.full and args.diloco:
        raise ConfigError("--full and --diloco: pick one baseline")
    check_range("workers", args.workers, low=1, high=job.heads if not args.diloco else None)
    check_range("eval_every", args.eval_every, low=0, note="0 evaluates only at the end")
    check_range("threads", args.threads, low=0, note="0 is torch's default")


def check_file_keys(path: str | None, values: dict) -> None:
    """Refuse a config-file key that no command knows (a typo must not be silently ignored).

    lte-sim reads the job keys and ``data_dir`` from a file; lte-server's other settings are
    accepted and unused, so that a run's ``config.toml`` runs here as it is. lte-sim's own flags
    (``full``, ``workers``, ``export``, ...) are read from the command line only: in a file they
    would be ignored, so they are refused too. Raises ConfigError naming the file and keys.
    """
    known = {f.name for f in fields(JobConfig)} | set(SERVER_TYPES)
    unknown = sorted(set(values) - known)
    own = {action.dest for action in build_parser()._actions}
    flags = [key for key in unknown if key in own]
    if flags:
        raise ConfigError(
            f"--config {path}: {flags} are lte-sim flags, read from the command line only "
            f"(give {' '.join('--' + key.replace('_', '-') for key in flags)} there)"
        )
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; lte-sim --help lists the options")


@one_line_errors("lte-sim")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        file_values = load_toml(args.config, SERVER_TYPES) if args.config else {}
        check_file_keys(args.config, file_values)
        job = resolve_job(args, file_values)
        if job.dataset not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {job.dataset!r}; choose one of {DATASET_NAMES}")
        check_job(job)
        check_sim_args(args, job)
        if args.threads:
            torch.set_num_threads(args.threads)
        data_dir = args.data_dir or file_values.get("data_dir")
        dataset = load_job_dataset(job, data_dir, skip_bad_images=args.skip_bad_images)
        dataset = eval_subset(dataset, args.eval_samples, job.seed)
        job = job.with_dataset(dataset)
        check_job_data(job, dataset)
        lte = not (args.full or args.diloco)  # the LTE warnings concern LTE runs only
        heads = len(partition_heads(job.heads, args.workers)[0]) if lte else 1
        explanation = startup_model_check(job, dataset, heads, args.explain_model, "lte-sim" if lte else "")
        if explanation is not None:
            print(explanation)
            return 0
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"lte-sim: error: {exc}", file=sys.stderr)
        return 2
    if args.full:
        mode = "full"
    elif args.diloco:
        mode = f"diloco workers={args.workers} H={job.merge_every}"
    else:
        mode = f"lte N={job.heads} r={job.rank} T={job.merge_every} quant={job.quant}"
    mode += f" precision={MixedPrecision(job.precision, args.device).precision}"
    progress = None if args.quiet else Progress(job.heads * job.rounds, f"{job.model}/{job.dataset} {mode}")
    common = {"device": args.device, "eval_every": args.eval_every, "progress": progress}
    try:
        if args.full:
            result = run_full(job, dataset, **common)
        else:
            run = run_diloco if args.diloco else run_lte
            result = run(job, dataset, workers=args.workers, **common)
    except BadImageError as exc:  # found while streaming: one line, not a traceback
        if progress:
            progress.close()
        print(f"lte-sim: error: {exc}", file=sys.stderr)
        return 2
    if progress:
        progress.close()
    if args.export:
        export_model(args.export, result.master, job, dataset, version=result.rounds)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        acc = (
            f"test accuracy {summary['test_accuracy']:.4f}, " if summary["test_accuracy"] is not None else ""
        )
        split = "test"
        if "perplexity" in summary:  # a language model scores its validation tokens (val.bin)
            acc = f"perplexity {summary['perplexity']:.3f}, bits per byte {summary['bits_per_byte']:.4f}, "
            split = "val"
        loss = (
            f"{split} loss {summary['test_loss']:.4f}"
            if summary["test_loss"] is not None
            else f"no {split} metrics"
        )
        print(f"{mode}: {acc}{loss}, {summary['samples']} samples in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
