"""``lte-server``: the parameter server of an LTE job (and, with --local-workers, a whole local cluster)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lte.common.checks import one_line_errors
from lte.common.config import add_job_arguments, check_job, load_toml, resolve_job
from lte.common.logs import setup_logging
from lte.common.progress import Progress, format_bytes
from lte.server.startup import (
    SERVER_TYPES,
    check_server_settings,
    discard_run_folder,
    local_worker_command,
    prepare_run_folder,
)

# kept under 80 columns, so a terminal never wraps a flag in two
SERVER_EXAMPLES = """examples:
  # a whole local cluster: 3 workers on this machine
  lte-server --model mlp --dataset fashion-mnist --local-workers 3

  # other machines need a shared token (16+ characters); then on each box:
  #   LTE_TOKEN=<the same token> lte-worker --server <this host>:50051
  export LTE_TOKEN=$(python3 -c 'import secrets;print(secrets.token_hex(24))')
  lte-server --model vit-b --dataset fashion-mnist --heads 32 \\
      --rank 64 --alpha 4096 --merge-every 10 --mode async \\
      --host 0.0.0.0 --port 50051"""


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
    return parser


SERVER_DEFAULTS = {
    "host": "127.0.0.1",
    "port": 50051,
    "device": "cpu",
    "heads_per_worker": 0,
    "lease_timeout": 30.0,
    "heartbeat_interval": 5.0,
    "max_staleness": 8,
    "buffer_size": 0,
    "eval_every": -1,
    "out": None,
    "local_workers": 0,
    "worker_device": "cpu",
    "data_dir": None,
    "threads": 0,
    "rpc_threads": 0,
    "dashboard_host": "127.0.0.1",
    "dashboard_port": 8080,
    "dashboard_auth": False,
    "checkpoint_every": -1,
    "keep_checkpoints": 3,
    "linger": -1.0,
    "resume": None,
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


def check_config_keys(file_values: dict, job_keys: set[str]) -> None:
    unknown = sorted(set(file_values) - job_keys - SERVER_KEYS)
    if unknown:
        raise ValueError(f"config file: unknown key(s) {unknown}")


SECRETS = ("token",)


def public_settings(values: dict) -> dict:
    """Settings fit to print or write to disk: secrets masked."""
    return {k: ("<set>" if k in SECRETS and v else v) for k, v in values.items()}


def to_toml(values: dict) -> str:
    lines = []
    for k, v in values.items():
        if v is None:
            continue
        lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}")
    return "\n".join(lines) + "\n"


def start_worker_processes(
    address: str, per_worker_args: list[list[str]], log_dir: Path | None = None, token: str | None = None
) -> list[subprocess.Popen]:
    """One real ``lte-worker`` process per entry (its extra flags), logging to ``log_dir/worker-<i>.log``.

    The token reaches them through the environment, never the command line (which ps shows).
    """
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if token:
        env["LTE_TOKEN"] = token
    procs = []
    for i, extra in enumerate(per_worker_args):
        log = open(log_dir / f"worker-{i}.log", "w") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        cmd = [*local_worker_command(sys.executable, address), *extra]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        if log_dir:
            log.close()  # the child holds its own descriptor
    return procs


def stop_processes(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """Terminate by pid, wait, then kill what is left: no orphan survives the server."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@one_line_errors("lte-server")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        file_values = load_toml(args.config, SERVER_TYPES) if args.config else {}
        from dataclasses import fields

        from lte.common.config import JobConfig

        check_config_keys(file_values, {f.name for f in fields(JobConfig)} | {"data_dir"})
        job = resolve_job(args, file_values)
        srv = resolve_server(args, file_values)
        check_server_settings(job, srv)
        check_job(job)
        if args.print_config:
            print(to_toml(public_settings({**job.to_dict(), **srv})), end="")
            return 0
        from lte.common.data import load_dataset

        dataset = load_dataset(job.dataset, srv["data_dir"], seed=job.seed)
        job = job.with_dataset(dataset)
        out_dir, created = prepare_run_folder(srv["out"])
    except (ValueError, FileNotFoundError, OSError, TypeError) as exc:
        print(f"lte-server: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_format, "WARNING" if args.quiet else "INFO", prog="lte-server")
    code = serve(
        job,
        dataset,
        {**srv, "out": str(out_dir)},
        json_out=args.json,
        quiet=args.quiet,
        log_format=args.log_format,
        tensorboard=args.tensorboard,
    )
    if code == 2:  # a refused start leaves no empty run folder behind
        discard_run_folder(out_dir, created)
    return code


def serve(
    job,
    dataset,
    srv: dict,
    *,
    json_out: bool = False,
    quiet: bool = False,
    log_format: str = "text",
    tensorboard: str | None = None,
) -> int:
    import torch

    from lte.common.auth import token_from
    from lte.common.run_metadata import resolved_job
    from lte.server.app import ParameterServer, format_address
    from lte.server.checkpoint import load_checkpoint
    from lte.server.coordinator import Coordinator
    from lte.server.disk import export_with_fallback, final_checkpoint
    from lte.server.finish import linger, linger_seconds
    from lte.server.security import server_credentials

    if srv["threads"]:
        torch.set_num_threads(srv["threads"])
    out_dir = Path(srv["out"] or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    local = int(srv["local_workers"] or 0)
    heads_per_worker = srv["heads_per_worker"] or (-(-job.heads // local) if local else 0)
    eval_every = srv["eval_every"] if srv["eval_every"] >= 0 else max(1, job.rounds // 10)
    checkpoint_every = srv["checkpoint_every"] if srv["checkpoint_every"] >= 0 else max(1, job.rounds // 10)
    try:
        token = token_from(srv["token"])
        credentials = server_credentials(srv["tls_cert"], srv["tls_key"], srv["tls_ca"])
    except (ValueError, OSError) as exc:
        print(f"lte-server: error: {exc}", file=sys.stderr)
        return 2
    coordinator = Coordinator(
        job,
        dataset,
        device=srv["device"],
        heads_per_worker=heads_per_worker,
        lease_timeout_s=srv["lease_timeout"],
        heartbeat_interval_s=srv["heartbeat_interval"],
        max_staleness=srv["max_staleness"],
        buffer_size=srv["buffer_size"],
        eval_every=eval_every,
        checkpoint_dir=out_dir / "checkpoints",
        checkpoint_every=checkpoint_every,
        keep_checkpoints=srv["keep_checkpoints"],
        metrics_path=out_dir / "metrics.jsonl",
    )
    if srv["resume"]:
        try:
            state, tensors = load_checkpoint(srv["resume"])
            coordinator.restore(state, tensors)
        except (ValueError, OSError) as exc:
            print(f"lte-server: error: cannot resume from {srv['resume']}: {exc}", file=sys.stderr)
            return 2
        print(f"lte-server: resumed at version {coordinator.version} from {srv['resume']}", file=sys.stderr)
    effective = {
        "heads_per_worker": heads_per_worker,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
    }
    (out_dir / "config.toml").write_text(to_toml(public_settings({**resolved_job(job), **srv, **effective})))
    try:
        server = ParameterServer(
            coordinator,
            host=srv["host"],
            port=srv["port"],
            token=token,
            credentials=credentials,
            threads=srv["rpc_threads"],
        )
        server.start()
    except (OSError, ValueError) as exc:
        print(f"lte-server: error: {exc}", file=sys.stderr)
        return 2
    log = logging.getLogger("lte.server")
    if tensorboard:
        try:
            coordinator.add_sink(tensorboard_sink(tensorboard))
        except ImportError as exc:
            server.stop()
            print(
                f"lte-server: error: --tensorboard needs the tensorboard package ({exc}); pip install tensorboard",
                file=sys.stderr,
            )
            return 2
    dashboard = None
    if srv["dashboard_port"] >= 0:
        from lte.server.dashboard import DashboardServer

        try:
            dashboard = DashboardServer(
                coordinator.status,
                host=srv["dashboard_host"],
                port=srv["dashboard_port"],
                token=token if srv["dashboard_auth"] else None,
            ).start()
        except OSError as exc:
            server.stop()
            print(
                f"lte-server: error: dashboard: {exc} (pick another --dashboard-port, or -1 for none)",
                file=sys.stderr,
            )
            return 2
        if quiet and log_format == "text":  # printed even with --quiet: it is the one line a user needs
            print(f"lte-server: dashboard at {dashboard.url}", file=sys.stderr, flush=True)
        else:
            log.info("dashboard at %s", dashboard.url, extra={"url": dashboard.url})
    log.info(
        "%s on %s, N=%d r=%d T=%d mode=%s quant=%s; %d rounds",
        job.model,
        job.dataset,
        job.heads,
        job.rank,
        job.merge_every,
        job.mode,
        job.quant,
        job.rounds,
    )
    log.info(
        "serving lte.v1.ParameterServer on %s  (run folder %s)",
        server.address,
        out_dir,
        extra={"address": server.address, "run_dir": str(out_dir)},
    )
    if not local:
        log.info(
            "start workers with: lte-worker --server %s",
            format_address(_public_host(srv["host"]), server.port),
        )
    signal.signal(signal.SIGTERM, _interrupt)
    if credentials is not None:  # the certificate names the host; local workers reach it as localhost
        local_host = "localhost"
    else:
        local_host = "127.0.0.1" if srv["host"] in ("0.0.0.0", "::", "127.0.0.1") else srv["host"]
    tls = ["--tls-ca", srv["tls_ca"] or srv["tls_cert"]] if credentials is not None else []
    local_args = [
        [
            "--device",
            srv["worker_device"],
            "--name",
            f"local-{i}",
            "--parent-pid",
            str(os.getpid()),  # no --quiet: worker-<i>.log holds each worker's own log lines
            *tls,
        ]
        for i in range(local)
    ]
    procs = start_worker_processes(format_address(local_host, server.port), local_args, out_dir, token=token)
    started = time.perf_counter()
    progress = None
    if not quiet and log_format == "text":
        progress = Progress(job.rounds if job.mode == "sync" else None, "lte-server")
    last_status_log = 0.0
    code = 0
    try:
        while not server.wait_done(timeout=1.0):
            st = coordinator.status()
            if progress:
                fields = {
                    "version": st["version"],
                    "workers": sum(w["state"] not in ("left", "expired") for w in st["workers"]),
                }
                if st["history"]:
                    fields["loss"] = st["history"][-1]["train_loss"]
                if st["evals"] and "test_accuracy" in st["evals"][-1]:
                    fields["acc"] = st["evals"][-1]["test_accuracy"]
                fields.update(bytes_up=float(st["bytes_up"]), bytes_down=float(st["bytes_down"]))
                progress.update(st["version"], **fields)
            elif log_format == "json" and time.monotonic() - last_status_log >= 10:
                last_status_log = time.monotonic()
                log.info(
                    "progress", extra={k: st[k] for k in ("version", "samples", "bytes_up", "bytes_down")}
                )
            if procs and all(p.poll() is not None for p in procs):
                codes = [p.returncode for p in procs]
                raise RuntimeError(
                    f"every local worker exited (codes {codes}) before the job finished; see {out_dir}/worker-*.log"
                )
        if progress:
            progress.close()
        log.info("final evaluation: version %d on %d test samples", coordinator.version, len(dataset.test_y))
        final = coordinator.evaluate_now()
        model_path = export_with_fallback(coordinator.export, out_dir)  # a full disk: a named fallback
        summary = {
            "test_accuracy": final.get("test_accuracy"),
            "test_loss": final["test_loss"],
            "version": coordinator.version,
            "samples": coordinator.samples,
            "bytes_up": coordinator.bytes_up,
            "bytes_down": coordinator.bytes_down,
            "seconds": round(time.perf_counter() - started, 3),
            "model": str(model_path),
            "run_dir": str(out_dir),
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc = (
            f"test accuracy {summary['test_accuracy']:.4f}, " if summary["test_accuracy"] is not None else ""
        )
        log.info(
            "done: version %d, %sup %s, down %s, %.1f s; model saved to %s",
            summary["version"],
            acc,
            format_bytes(summary["bytes_up"]),
            format_bytes(summary["bytes_down"]),
            summary["seconds"],
            model_path,
            extra={"summary": summary},
        )
        # let the workers see "done" on their next pull or heartbeat, then stop
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break  # stop_processes below ends it
        if json_out:
            print(json.dumps(summary), flush=True)
        linger(
            linger_seconds(srv["linger"], has_dashboard=dashboard is not None),
            dashboard.url if dashboard is not None else None,
        )
    except KeyboardInterrupt:
        if progress:
            progress.close()
        log.warning("interrupted; saving a checkpoint, stopping workers and the server")
        path = final_checkpoint(coordinator.save_checkpoint, coordinator.export, out_dir)
        if path:
            log.warning("checkpoint %s; continue with --resume %s", path, out_dir)
        code = 130
    except RuntimeError as exc:
        print(f"lte-server: error: {exc}", file=sys.stderr)
        code = 1
    finally:
        stop_processes(procs)
        if dashboard is not None:
            dashboard.stop()
        server.stop()
    return code


def tensorboard_sink(directory: str):
    """A metrics sink writing TensorBoard scalars (train loss, accuracy, bytes) per version."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(directory)

    def write(record: dict) -> None:
        step = int(record.get("version", 0))
        for key in ("train_loss", "test_loss", "test_accuracy", "bytes_up", "bytes_down", "samples"):
            if isinstance(record.get(key), (int, float)):
                writer.add_scalar(("eval/" if record.get("eval") else "train/") + key, record[key], step)
        writer.flush()

    return write


def _public_host(host: str) -> str:
    if host in ("0.0.0.0", "::", "[::]"):
        import socket

        return socket.gethostname()
    return host


if __name__ == "__main__":
    sys.exit(main())
