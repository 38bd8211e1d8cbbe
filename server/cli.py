"""``lte-server``: the parameter server of an LTE job (and, with --local-workers, a whole local cluster)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from lte.common.checks import one_line_errors
from lte.common.config import (
    EXPLAIN_HELP,
    add_job_arguments,
    check_job,
    check_job_data,
    job_from_dict,
    load_toml,
    resolve_job,
)
from lte.common.logs import setup_logging
from lte.common.run_metadata import resolved_job
from lte.server.run import ServerRun, StartError
from lte.server.startup import SERVER_TYPES, check_server_settings, discard_run_folder, prepare_run_folder

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
    parser = argparse.ArgumentParser(
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
    s.add_argument(
        "--host", default=None, help="address to listen on; 0.0.0.0 or :: for other machines [127.0.0.1]"
    )
    s.add_argument("--port", type=int, default=None, help="gRPC port, 0 for any free one [50051]")
    s.add_argument("--device", default=None, help="device of the master weights and merges [cpu]")
    s.add_argument(
        "--data-dir", default=None, help="dataset folder (Fashion-MNIST IDX files, imagefolder root)"
    )
    s.add_argument(
        "--skip-bad-images",
        action="store_true",
        default=None,
        help="skip (and count) image files that do not decode instead of stopping [stop]",
    )
    s.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="DataLoader processes decoding streamed images: the server's evaluation uses this many, "
        "--local-workers get it too [0 here, 2 on local workers]",
    )
    s.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="evaluate on a fixed class-balanced subset of K test samples, 0 for all [0]",
    )
    s.add_argument(
        "--heads-per-worker",
        type=int,
        default=None,
        help="most heads one worker may lease [N / local workers, or N]",
    )
    s.add_argument(
        "--lease-timeout",
        type=float,
        default=None,
        help="seconds without a heartbeat before a lease expires [30]",
    )
    s.add_argument(
        "--heartbeat-interval", type=float, default=None, help="seconds between worker heartbeats [5]"
    )
    s.add_argument(
        "--straggler-factor",
        type=float,
        default=None,
        help="move a live worker's heads once it has not pushed for K x the job's median round time "
        "(and at least 2 heartbeats); 0 for never [4]",
    )
    s.add_argument(
        "--max-staleness", type=int, default=None, help="async/buffered: refuse pushes staler than this [8]"
    )
    s.add_argument("--buffer-size", type=int, default=None, help="buffered mode: pushes per merge [N/4]")
    s.add_argument(
        "--eval-every", type=int, default=None, help="evaluate every K versions, 0 for only at the end [auto]"
    )
    s.add_argument(
        "--out", default=None, help="run folder for metrics.jsonl and model.safetensors [runs/<time>]"
    )
    s.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads of the server [torch default]"
    )
    s.add_argument(
        "--rpc-threads",
        type=int,
        default=None,
        help="gRPC handler threads; long-polls never take the last quarter of them "
        "[LTE_SERVER_THREADS or 64]",
    )
    s.add_argument(
        "--local-workers",
        type=int,
        default=None,
        help="start K worker processes on loopback and stop them at exit",
    )
    s.add_argument("--worker-device", default=None, help="device of the local workers [cpu]")
    s.add_argument("--dashboard-host", default=None, help="address of the web dashboard [127.0.0.1]")
    s.add_argument(
        "--dashboard-port",
        type=int,
        default=None,
        help="dashboard port, 0 for any free one, -1 for none [8080]",
    )
    s.add_argument(
        "--dashboard-auth", action="store_true", default=None, help="the dashboard requires the token too"
    )
    s.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="checkpoint every K versions, 0 for never [rounds/10]",
    )
    s.add_argument("--keep-checkpoints", type=int, default=None, help="newest checkpoints kept [3]")
    s.add_argument(
        "--linger",
        type=float,
        default=None,
        help="seconds to keep serving the final state (dashboard, 'job over' to late workers) after "
        "the job; -1: until Ctrl+C on a terminal with a dashboard, else 0 [-1]",
    )
    s.add_argument(
        "--resume", default=None, help="continue from a checkpoint folder or a run folder's newest one"
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="reuse an --out folder that holds an earlier job's model.safetensors (replacing it)",
    )
    s.add_argument(
        "--update-guard",
        choices=("refuse", "clip", "off"),
        default=None,
        help="pushes whose per-layer contribution is out of bounds (server/guard.py): refuse them, "
        "clip them to the bound, or merge everything (off) [refuse]",
    )
    sec = parser.add_argument_group("security")
    sec.add_argument(
        "--token",
        default=None,
        help="shared secret workers must send, at least 16 visible ASCII characters "
        "(or set LTE_TOKEN, which ps does not show); required off loopback",
    )
    sec.add_argument("--tls-cert", default=None, help="PEM certificate of the server (enables TLS)")
    sec.add_argument("--tls-key", default=None, help="PEM private key of the server")
    sec.add_argument(
        "--tls-ca", default=None, help="PEM CA that client certificates must chain to (mutual TLS)"
    )
    s.add_argument("--log-format", choices=("text", "json"), default="text", help="stderr log lines [text]")
    s.add_argument("--tensorboard", default=None, help="also write TensorBoard scalars to this folder")
    s.add_argument("--json", action="store_true", help="print one final JSON line with the results")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--explain-model", action="store_true", help=EXPLAIN_HELP)
    return parser


SERVER_DEFAULTS = {
    "host": "127.0.0.1",
    "port": 50051,
    "device": "cpu",
    "heads_per_worker": 0,
    "lease_timeout": 30.0,
    "heartbeat_interval": 5.0,
    "straggler_factor": 4.0,
    "max_staleness": 8,
    "buffer_size": 0,
    "eval_every": -1,
    "out": None,
    "local_workers": 0,
    "worker_device": "cpu",
    "data_dir": None,
    "skip_bad_images": False,
    "loader_workers": -1,
    "eval_samples": 0,
    "threads": 0,
    "rpc_threads": 0,
    "dashboard_host": "127.0.0.1",
    "dashboard_port": 8080,
    "dashboard_auth": False,
    "checkpoint_every": -1,
    "keep_checkpoints": 3,
    "linger": -1.0,
    "resume": None,
    "overwrite": False,
    "update_guard": "refuse",
    "token": None,
    "tls_cert": None,
    "tls_key": None,
    "tls_ca": None,
}
SERVER_KEYS = frozenset(SERVER_DEFAULTS)


def resolve_server(args: argparse.Namespace, file_values: dict) -> dict:
    """Server settings with the same precedence as the job: flags > file > defaults."""
    out = dict(SERVER_DEFAULTS)
    out.update({k: v for k, v in file_values.items() if k in SERVER_KEYS})
    out.update({k: getattr(args, k) for k in SERVER_KEYS if getattr(args, k, None) is not None})
    return out


def check_config_keys(path: str, file_values: dict, job_keys: set[str]) -> None:
    """Refuse a key of the file at ``path`` that is neither a job field nor a server setting."""
    unknown = sorted(set(file_values) - job_keys - SERVER_KEYS)
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; lte-server --help lists the options")


SECRETS = ("token",)
MASKED = "<set>"  # a secret's value where settings are printed (a config file holding it means "unset")


def public_settings(values: dict) -> dict:
    """Settings fit to print: secrets masked."""
    return {k: (MASKED if k in SECRETS and v else v) for k, v in values.items()}


def to_toml(values: dict) -> str:
    lines = []
    for k, v in values.items():
        if v is None:
            continue
        lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}")
    return "\n".join(lines) + "\n"


@one_line_errors("lte-server")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.resume and not args.config:  # `--resume RUN` alone: the run's own (resolved) job
            own = resumed_run_folder(args.resume) / "config.toml"
            args.config = str(own) if own.is_file() else None
        file_values = load_toml(args.config, SERVER_TYPES) if args.config else {}
        file_values = {k: v for k, v in file_values.items() if not (k in SECRETS and v == MASKED)}
        from dataclasses import fields

        from lte.common.config import JobConfig

        check_config_keys(args.config, file_values, {f.name for f in fields(JobConfig)} | {"data_dir"})
        job = resolve_job(args, file_values)
        srv = resolve_server(args, file_values)
        check_server_settings(job, srv)
        check_job(job)
        if args.print_config:
            print(to_toml(public_settings({**job.to_dict(), **srv})), end="")
            return 0
        from lte.common.data import eval_subset, load_job_dataset

        dataset = load_job_dataset(job, srv["data_dir"], skip_bad_images=srv["skip_bad_images"])
        dataset = eval_subset(dataset, srv["eval_samples"], job.seed)
        job = job.with_dataset(dataset)
        check_job_data(job, dataset)
        job = job_from_dict(resolved_job(job))  # no placeholder left: config.toml, checkpoints, workers
        from lte.common.model_check import startup_model_check

        local = int(srv["local_workers"] or 0)
        heads = srv["heads_per_worker"] or (-(-job.heads // local) if local else job.heads)
        explanation = startup_model_check(
            job, dataset, heads, args.explain_model, "lte-server"
        )  # refuses in one line
        if explanation is not None:
            print(explanation)
            return 0
        if srv["resume"] and not args.out:  # a resumed run goes on writing into its own folder
            srv = {**srv, "out": str(resumed_run_folder(srv["resume"]))}
        out_dir, created = prepare_run_folder(srv["out"])
        srv = {**srv, "out": str(out_dir)}
        from lte.common.checks import ConfigError
        from lte.server.runlock import RunLock, check_reused_out

        lock = RunLock(out_dir).acquire()  # one job per run folder: a second server is refused here
        try:
            check_reused_out(out_dir, overwrite=bool(srv["overwrite"]), resume=bool(srv["resume"]))
        except ConfigError:
            lock.release()
            raise
    except (ValueError, FileNotFoundError, OSError, TypeError) as exc:
        print(f"lte-server: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_format, "WARNING" if args.quiet else "INFO", prog="lte-server")
    try:
        run = ServerRun(
            job,
            dataset,
            srv,
            json_out=args.json,
            quiet=args.quiet,
            log_format=args.log_format,
            tensorboard=args.tensorboard,
            config_text=lambda effective: to_toml(
                {k: v for k, v in {**resolved_job(job), **srv, **effective}.items() if k not in SECRETS}
            ),  # what `--resume RUN` reads back: a secret stays in LTE_TOKEN, never on disk
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


def resumed_run_folder(resume: str) -> Path:
    """The run folder of ``--resume``: the folder itself, or the run a checkpoint folder belongs to."""
    path = Path(resume)
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path


if __name__ == "__main__":
    sys.exit(main())
