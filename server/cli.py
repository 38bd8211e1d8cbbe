"""``lte-server``: the parameter server of an LTE job (and, with --local-workers, a whole local cluster)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from lte.common.data.datasets import dataset_metadata, eval_subset, load_job_dataset
from lte.common.job.checks import ConfigError, OneLineArgumentParser, flag, one_line_errors
from lte.common.job.config import (
    EXPLAIN_HELP,
    MASKED,
    SECRETS,
    SERVER_TYPES,
    JobConfig,
    ServerSettings,
    add_job_arguments,
    check_job,
    check_job_data,
    job_from_dict,
    load_toml,
    resolve_job,
)
from lte.common.job.logs import setup_logging
from lte.common.job.model_check import startup_model_check
from lte.common.job.run_metadata import resolved_job
from lte.server.checkpoint import checkpoint_folder, job_difference
from lte.server.runlock import RunLock, check_reused_out
from lte.server.startup import check_server_settings, discard_run_folder, prepare_run_folder

# kept under 80 columns, so a terminal never wraps a flag in two
SERVER_EXAMPLES = """examples:
  # a whole local cluster: 3 workers on this machine
  lte-server --model mlp --dataset fashion-mnist --local-workers 3

  # other machines need a shared token (16+ characters); then on each box:
  #   LTE_TOKEN=<the same token> lte-worker --server <this host>:50051
  export LTE_TOKEN=$(python3 -c 'import secrets;print(secrets.token_hex(24))')
  lte-server --model vit-micro --dataset fashion-mnist --heads 8 \\
      --rank 64 --alpha 32 --lr 1e-3 --merge-every 10 --mode async \\
      --host 0.0.0.0 --port 50051

  # stopped (Ctrl+C, SIGTERM, SIGHUP): continue from the run's checkpoint
  lte-server --resume runs/<time>"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="lte-server",
        description=textwrap.fill(
            "Parameter server for LoRA-the-Explorer: holds the full-precision weights, leases LoRA heads "
            "to workers, folds their low-rank updates into the model, evaluates and exports it.",
            79,
        ),
        epilog=SERVER_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(parser)
    parser.add_argument("--config", help="TOML file with any flag (flags given here win)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration as TOML and exit"
    )
    s = parser.add_argument_group("server")
    sec = parser.add_argument_group("security")
    add_server_arguments({"server": s, "security": sec})
    s.add_argument("--log-format", choices=("text", "json"), default="text", help="stderr log lines [text]")
    s.add_argument("--tensorboard", default=None, help="also write TensorBoard scalars to this folder")
    s.add_argument("--json", action="store_true", help="print one final JSON line with the results")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--explain-model", action="store_true", help=EXPLAIN_HELP)
    return parser


def add_server_arguments(groups: dict[str, argparse._ArgumentGroup]) -> None:
    """One flag per ``ServerSettings`` field, in its group, with its help; defaults are None so that
    a config file can fill them (``ServerSettings.resolve``)."""
    for f in fields(ServerSettings):
        meta, kind = f.metadata, SERVER_TYPES[f.name]
        options: dict[str, Any] = {"default": None, "help": meta["help"]}
        if kind is bool:
            options["action"] = "store_true"
        elif kind is not str:
            options["type"] = kind
        if meta["choices"]:
            options["choices"] = meta["choices"]
        groups[meta["group"]].add_argument(flag(f.name), **options)


def check_config_keys(path: str, file_values: dict, job_keys: set[str]) -> None:
    """Refuse a key of the file at ``path`` that is neither a job field nor a server setting."""
    unknown = sorted(set(file_values) - job_keys - set(SERVER_TYPES))
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; lte-server --help lists the options")


def to_toml(values: dict) -> str:
    """``key = value`` lines of a flat config (None values left out: the option's default)."""
    lines = []
    for k, v in values.items():
        if v is None:
            continue
        lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}")
    return "\n".join(lines) + "\n"


def job_for_data(job: JobConfig, dataset: Any) -> JobConfig:
    """The job with what the data decides filled in (image size, channels, classes, vocabulary,
    context...) and no placeholder left: what config.toml, checkpoints and workers get.

    ``dataset``: a loaded dataset, or ``lte.common.data.datasets.dataset_metadata``'s description of one.
    Raises ValueError when the data cannot feed the job (``check_job_data``).
    """
    job = job.with_dataset(dataset)
    check_job_data(job, dataset)
    return job_from_dict(resolved_job(job))


@one_line_errors("lte-server")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume and not args.config:  # `--resume RUN` alone: the run's own (resolved) job
            own = resumed_run_folder(args.resume) / "config.toml"
            args.config = str(own) if own.is_file() else None
        file_values = load_toml(args.config, SERVER_TYPES) if args.config else {}
        file_values = {k: v for k, v in file_values.items() if not (k in SECRETS and v == MASKED)}
        check_config_keys(args.config, file_values, {f.name for f in fields(JobConfig)})
        job = resolve_job(args, file_values)
        settings = ServerSettings.resolve(args, file_values)
        check_server_settings(job, settings)
        check_job(job)
        if settings.resume and not args.out:  # a resumed run goes on writing into its own folder
            settings = replace(settings, out=str(resumed_run_folder(settings.resume)))
        if args.print_config:  # the job as a start resolves it, from the data's metadata only
            job = job_for_data(job, dataset_metadata(job, settings.data_dir))
            if settings.resume:  # what a start refuses before it serves: no checkpoint, another job
                check_resumable(settings.resume, job)
            print(to_toml({**resolved_job(job), **settings.resolved(job).public()}), end="")
            return 0
        dataset = load_job_dataset(job, settings.data_dir, skip_bad_images=settings.skip_bad_images)
        dataset = eval_subset(dataset, settings.eval_samples, job.seed)
        job = job_for_data(job, dataset)
        heads = settings.resolved(job).heads_per_worker or job.heads
        explanation = startup_model_check(
            job, dataset, heads, args.explain_model, "lte-server"
        )  # refuses in one line
        if explanation is not None:
            print(explanation)
            return 0
        out_dir, created = prepare_run_folder(settings.out)
        settings = replace(settings, out=str(out_dir))
        lock = RunLock(out_dir).acquire()  # one job per run folder: a second server is refused here
        try:
            check_reused_out(out_dir, overwrite=settings.overwrite, resume=bool(settings.resume))
        except ConfigError:
            lock.release()
            raise
    except (ValueError, FileNotFoundError, OSError, TypeError) as exc:
        print(f"lte-server: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_format, "WARNING" if args.quiet else "INFO", prog="lte-server")
    # lazy, the one such import here: the gRPC service and the web app (lte.server.run's imports)
    # add 2.8 s to `lte-server --help` (median of 6 on the loaded 2-core machine: 12.8 -> 15.6 s)
    from lte.server.run import ServerRun, StartError

    try:
        run = ServerRun(
            job,
            dataset,
            settings,
            json_out=args.json,
            quiet=args.quiet,
            log_format=args.log_format,
            tensorboard=args.tensorboard,
            # what `--resume RUN` reads back: a secret stays in LTE_TOKEN, never on disk
            config_text=to_toml({**resolved_job(job), **settings.resolved(job).without_secrets()}),
        ).start()
    except StartError as exc:
        print(f"lte-server: error: {exc}", file=sys.stderr)
        lock.release()
        discard_run_folder(out_dir, created)  # a refused start leaves no empty run folder behind
        return 2
    try:
        return run.run()
    finally:
        run.stop()
        lock.release()


def check_resumable(resume: str, job: JobConfig) -> None:
    """ValueError (the start's ``cannot resume from`` line) when ``--resume`` holds no checkpoint or
    a checkpoint of another job; reads its state.json only."""
    try:
        state = json.loads((checkpoint_folder(resume) / "state.json").read_text())
        difference = job_difference(state.get("job", {}), job.to_dict())
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot resume from {resume}: {exc}") from None
    if difference:
        raise ValueError(f"cannot resume from {resume}: {difference}")


def resumed_run_folder(resume: str) -> Path:
    """The run folder of ``--resume``: the folder itself, or the run a checkpoint folder belongs to."""
    path = Path(resume)
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path


if __name__ == "__main__":
    sys.exit(main())
