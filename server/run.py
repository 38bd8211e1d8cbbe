"""One ``lte-server`` run as an object: ``start()`` (run folder, coordinator, gRPC, dashboard, local
workers), ``run()`` (progress until the job ends, final evaluation, export, summary) and ``stop()``.
The CLI and the tests share it."""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lte.common.job.config import JobConfig, ServerSettings
from lte.common.job.progress import Progress, format_bytes, format_duration
from lte.common.job.signals import stop_signals
from lte.common.wire.auth import token_from
from lte.server.checkpoint import load_checkpoint
from lte.server.coordinator import Coordinator
from lte.server.dashboard import DashboardServer
from lte.server.disk import export_with_fallback, final_checkpoint
from lte.server.finish import linger, linger_seconds
from lte.server.grpc_server import ParameterServer, format_address
from lte.server.guard import GuardSettings
from lte.server.security import server_credentials
from lte.server.startup import local_worker_command, program, worker_hint
from lte.server.status import status_document

_log = logging.getLogger("lte.server")


LM_METRICS = ("perplexity", "bits_per_byte")  # language models' evaluation, beside test_loss


class StartError(Exception):
    """The server cannot start as configured; the message says why and what to do."""


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
        cmd = [*local_worker_command(sys.executable, address), *extra]  # a ./lte folder cannot shadow it
        if log_dir is None:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env))
            continue
        with open(log_dir / f"worker-{i}.log", "w") as log:  # closed here: the child holds its own descriptor
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
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


def local_data_args(settings: ServerSettings) -> list[str]:
    """The data options a local worker needs to load the job's dataset as the server does."""
    args = ["--data-dir", str(settings.data_dir)] if settings.data_dir else []
    if settings.skip_bad_images:
        args.append("--skip-bad-images")
    if settings.loader_workers >= 0:
        args += ["--loader-workers", str(settings.loader_workers)]
    return args


def resume_command(run_dir: Path) -> str:
    """The command that continues the job of ``run_dir`` from its newest checkpoint, shell-quoted
    (a folder name with a space or a quote pastes as one word), with absolute paths (it pastes from any
    folder, not only the one the server started in, and runs in a shell that did not activate the
    ``.venv``: see ``program``): its config.toml holds the resolved job."""
    run_dir = Path(run_dir).absolute()
    return shlex.join(
        [program("lte-server"), "--config", str(run_dir / "config.toml"), "--resume", str(run_dir)]
    )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _already_stopping(signum, frame) -> None:
    _log.warning("%s: already stopping (saving the checkpoint first)", signal.Signals(signum).name)


def public_host(host: str) -> str:
    if host in ("0.0.0.0", "::", "[::]"):
        return socket.gethostname()
    return host


def tensorboard_sink(directory: str):
    """A metrics sink writing TensorBoard scalars (train loss, accuracy, bytes) per version."""
    # lazy: tensorboard is an optional package (a missing one is a StartError naming it)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(directory)

    def write(record: dict) -> None:
        step = int(record.get("version", 0))
        for key in (
            "train_loss",
            "test_loss",
            "test_accuracy",
            "bytes_up",
            "bytes_down",
            "samples",
            *LM_METRICS,
        ):
            if isinstance(record.get(key), (int, float)):
                writer.add_scalar(("eval/" if record.get("eval") else "train/") + key, record[key], step)
        if isinstance(record.get("sample"), str):  # language models: the evaluation's text sample
            writer.add_text("eval/sample", record["sample"], step)
        writer.flush()

    return write


def listen_problem(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on, naming the option to change, or "" when it can (a
    plain bind, closed at once: a race with another starter is still possible, and gRPC then says
    so itself). Port 0 is never taken; the host is still checked."""
    where = format_address(host, port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except socket.gaierror as exc:
        return f"--host {host}: cannot listen on {where} ({exc.strerror}); give a local name or address"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"--port {port}: cannot listen on {where} ({exc.strerror}); pick another, or 0 for a free one"
            )
        return f"--host {host}: cannot listen on {where} ({exc.strerror or exc}); give an address of this machine"
    return ""


class ServerRun:
    """A whole server run of ``job`` on ``dataset`` with ``settings`` (those of the command line,
    placeholders such as ``eval_every = -1`` still in; ``settings.resolved(job)`` is what runs)."""

    def __init__(
        self,
        job: JobConfig,
        dataset,
        settings: ServerSettings,
        *,
        json_out: bool = False,
        quiet: bool = False,
        log_format: str = "text",
        tensorboard: str | None = None,
        config_text: str = "",
    ) -> None:
        self.job, self.dataset, self.settings = job, dataset, settings
        self.json_out, self.quiet, self.log_format, self.tensorboard = (
            json_out,
            quiet,
            log_format,
            tensorboard,
        )
        self.config_text = config_text
        self.out_dir = Path(settings.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        self.coordinator: Coordinator | None = None
        self.server: ParameterServer | None = None
        self.dashboard: DashboardServer | None = None
        self.procs: list[subprocess.Popen] = []
        self.summary: dict[str, Any] | None = None

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> ServerRun:
        """Everything up to serving; ``StartError`` (nothing left running) when it cannot start."""
        job, srv = self.job, self.settings.resolved(self.job)
        local = srv.local_workers
        if srv.threads:
            torch.set_num_threads(srv.threads)
        try:
            token = token_from(srv.token)
            credentials = server_credentials(srv.tls_cert, srv.tls_key, srv.tls_ca)
        except (ValueError, OSError) as exc:
            raise StartError(str(exc)) from None
        problem = listen_problem(srv.host, srv.port)
        if problem:  # before the model is built, and before gRPC prints its own native error line
            raise StartError(problem)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        c = self.coordinator = Coordinator(
            job,
            self.dataset,
            device=srv.device,
            heads_per_worker=srv.heads_per_worker,
            lease_timeout_s=srv.lease_timeout,
            heartbeat_interval_s=srv.heartbeat_interval,
            straggler_factor=srv.straggler_factor,
            max_staleness=srv.max_staleness,
            buffer_size=srv.buffer_size,
            eval_every=srv.eval_every,
            checkpoint_dir=self.out_dir / "checkpoints",
            checkpoint_every=srv.checkpoint_every,
            keep_checkpoints=srv.keep_checkpoints,
            metrics_path=self.out_dir / "metrics.jsonl",
            guard=GuardSettings(mode=srv.update_guard),
        )
        c.evaluations.loader_workers = max(0, srv.loader_workers)
        if srv.resume:
            try:
                state, tensors = load_checkpoint(srv.resume)
                c.restore(state, tensors)
            except (ValueError, OSError) as exc:
                c.close()
                raise StartError(f"cannot resume from {srv.resume}: {exc}") from None
            print(f"lte-server: resumed at version {c.version} from {srv.resume}", file=sys.stderr)
        (self.out_dir / "config.toml").write_text(self.config_text)
        try:
            server = self.server = ParameterServer(
                c,
                host=srv.host,
                port=srv.port,
                token=token,
                credentials=credentials,
                threads=srv.rpc_threads,
            ).start()
        except (OSError, ValueError) as exc:
            c.close()
            raise StartError(str(exc)) from None
        if self.tensorboard:
            try:
                c.records.add_sink(tensorboard_sink(self.tensorboard))
            except ImportError as exc:
                self.stop()
                raise StartError(
                    f"--tensorboard needs the tensorboard package ({exc}); pip install tensorboard"
                ) from None
        if srv.dashboard_port >= 0:
            try:
                shown = srv.public()  # the dashboard's settings panel

                def status() -> dict[str, Any]:
                    return {**c.status(), "server": shown}

                dashboard = self.dashboard = DashboardServer(
                    status,
                    host=srv.dashboard_host,
                    port=srv.dashboard_port,
                    token=token if srv.dashboard_auth else None,
                ).start()
            except OSError as exc:
                self.stop()
                raise StartError(
                    f"--dashboard-port {srv.dashboard_port}: {exc} (pick another, 0 for a free one, "
                    'or -1 for none; under make: ARGS="--dashboard-port 0")'
                ) from None
            if self.quiet and self.log_format == "text":  # even with --quiet: the one line a user needs
                print(f"lte-server: dashboard at {dashboard.url}", file=sys.stderr, flush=True)
            else:
                _log.info("dashboard at %s", dashboard.url, extra={"url": dashboard.url})
        _log.info(
            "%s on %s, N=%d r=%d T=%d mode=%s quant=%s; %d rounds per head",
            job.model,
            job.dataset,
            job.heads,
            job.rank,
            job.merge_every,
            job.mode,
            job.quant,
            job.rounds,
        )
        _log.info(
            "serving lte.v1.ParameterServer on %s  (run folder %s)",
            server.address,
            self.out_dir,
            extra={"address": server.address, "run_dir": str(self.out_dir)},
        )
        if not local:
            _log.info("%s", worker_hint(format_address(public_host(srv.host), server.port), srv, token))
        if credentials is not None:  # the certificate names the host; local workers reach it as localhost
            local_host = "localhost"
        else:
            local_host = "127.0.0.1" if srv.host in ("0.0.0.0", "::", "127.0.0.1") else srv.host
        tls = ["--tls-ca", str(srv.tls_ca or srv.tls_cert)] if credentials is not None else []
        local_args = [
            [
                "--device",
                srv.worker_device,
                "--name",
                f"local-{i}",
                "--parent-pid",
                str(os.getpid()),  # no --quiet: worker-<i>.log holds each worker's own log lines
                *tls,
                *local_data_args(srv),
            ]
            for i in range(local)
        ]
        self.procs = start_worker_processes(
            format_address(local_host, server.port), local_args, self.out_dir, token=token
        )
        return self

    # -- run --------------------------------------------------------------------------------------
    def _started(self) -> tuple[Coordinator, ParameterServer]:
        if self.coordinator is None or self.server is None:
            raise RuntimeError("the server is not running: call start() first")
        return self.coordinator, self.server

    def _watch(self) -> None:
        """Progress until the job is done; RuntimeError when every local worker died first."""
        c, server = self._started()
        progress = None
        if not self.quiet and self.log_format == "text":
            progress = Progress(c.progress()[1], "lte-server")
        last_status_log = 0.0
        try:
            while not server.wait_done(timeout=1.0):
                doc = status_document(c)  # what the dashboard and /api/status show
                if progress:
                    fields: dict[str, Any] = {"version": doc.version, "workers": doc.workers_active}
                    if doc.waiting_heads:
                        fields["waiting"] = len(doc.waiting_heads)
                    if doc.history:
                        fields["loss"] = float("nan") if doc.train_loss is None else doc.train_loss
                    newest = doc.evals[-1] if doc.evals else None
                    if newest is not None and newest.test_accuracy is not None:
                        # the newest evaluation failed (its split gone?): the score shown is older
                        stale = f"(stale, v{newest.version})" if doc.eval_error else ""
                        fields["acc" + stale] = newest.test_accuracy
                    elif doc.eval_error:
                        fields["acc"] = "failed"
                    fields.update(bytes_up=float(doc.bytes_up), bytes_down=float(doc.bytes_down))
                    if doc.eta_s is not None:  # from the head-round rate measured so far
                        fields["eta"] = format_duration(doc.eta_s)
                    progress.update(doc.head_rounds_done, **fields)
                elif self.log_format == "json" and time.monotonic() - last_status_log >= 10:
                    last_status_log = time.monotonic()
                    keys = (
                        "version",
                        "head_rounds_done",
                        "target_head_rounds",
                        "samples",
                        "bytes_up",
                        "bytes_down",
                        "elapsed_s",
                        "eta_s",
                    )
                    _log.info("progress", extra={k: getattr(doc, k) for k in keys})
                if self.procs and all(p.poll() is not None for p in self.procs):
                    codes = [p.returncode for p in self.procs]
                    raise RuntimeError(
                        f"every local worker exited (codes {codes}) before the job finished; "
                        f"see {self.out_dir}/worker-*.log"
                    )
        finally:
            if progress:
                progress.close()

    def run(self) -> int:
        """Serve until the job ends, evaluate, export, write the summary, linger. Returns the exit code."""
        c, _ = self._started()
        started = time.perf_counter()
        # Ctrl+C, SIGTERM and a closed terminal (SIGHUP, unless started under nohup) stop the job the
        # same way: a checkpoint and the command that continues it (common/job/signals.py)
        for sig in stop_signals():
            signal.signal(sig, _interrupt)
        try:
            self._watch()
            _log.info("final evaluation: version %d", c.version)
            no_evaluation = ""
            try:
                final = c.evaluate_now()
            except Exception as exc:  # the trained model is worth more than its last score: export it anyway
                reason = c.evaluations.failed(exc)
                _log.error("final evaluation failed (%s); exporting the model without it", reason)
                final = {"test_loss": None, "test_accuracy": None}
                if not c.evals:
                    no_evaluation = reason
            model_path = export_with_fallback(c.export, self.out_dir)  # a full disk: a named fallback
            self.summary = summary = {
                "test_accuracy": final.get("test_accuracy"),
                "test_loss": final["test_loss"],
                **{k: final[k] for k in LM_METRICS if k in final},
                "version": c.version,
                "samples": c.samples,
                "bytes_up": c.bytes_up,
                "bytes_down": c.bytes_down,
                "seconds": round(time.perf_counter() - started, 3),
                "model": str(model_path),
                "run_dir": str(self.out_dir),
            }
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            acc = (
                f"test accuracy {summary['test_accuracy']:.4f}, "
                if summary["test_accuracy"] is not None
                else ""
            )
            if summary.get("perplexity") is not None:  # a language model: its validation scores
                acc = f"val loss {summary['test_loss']:.4f}, perplexity {summary['perplexity']:.2f}, " + (
                    f"{summary['bits_per_byte']:.3f} bits/byte, " if summary.get("bits_per_byte") else ""
                )
            _log.info(
                "done: version %d, %sup %s, down %s, %.1f s; model saved to %s",
                summary["version"],
                acc,
                format_bytes(summary["bytes_up"]),
                format_bytes(summary["bytes_down"]),
                summary["seconds"],
                model_path,
                extra={"summary": summary},
            )
            # let every worker see "done" on its next pull or heartbeat (and leave) before the port closes
            c.wait_for_workers_to_leave(timeout_s=2 * c.heartbeat_interval_s + 5.0)
            deadline = time.monotonic() + 10
            for p in self.procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break  # stop() ends it
            if self.json_out:
                print(json.dumps(summary), flush=True)
            stop_processes(self.procs)  # the workers have seen "done"; the dashboard may stay
            self.procs = []
            linger(
                linger_seconds(self.settings.linger, has_dashboard=self.dashboard is not None),
                self.dashboard.url if self.dashboard is not None else None,
            )
            if no_evaluation:  # a job with no score at all is not a success, whatever it trained
                print(
                    f"lte-server: error: no evaluation succeeded in this job ({no_evaluation}); "
                    f"the model is saved to {model_path}",
                    file=sys.stderr,
                )
                return 1
            return 0
        except KeyboardInterrupt:
            for sig in stop_signals():  # a second signal must not cut the save short
                signal.signal(sig, _already_stopping)
            c.begin_stop()
            _log.warning("interrupted; saving a checkpoint, stopping workers and the server")
            # an evaluation in progress is cancelled and joined first: none of its lines may follow
            # the resume line, nor its loader processes outlive the save (issue 25)
            c.stop_background()
            path = final_checkpoint(c.save_checkpoint, c.export, self.out_dir)
            if path:
                _log.warning(
                    "checkpoint %s; continue with: %s",
                    path,
                    resume_command(self.out_dir),
                    extra={"resume_command": resume_command(self.out_dir)},
                )
            return 130
        except RuntimeError as exc:
            print(f"lte-server: error: {exc}", file=sys.stderr)
            return 1

    # -- stop ---------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything in a fixed order; safe to call twice. The local workers (by pid: they leave),
        then the background evaluation (cancelled at its next batch, its loader processes with it)
        and checkpoint writer (finished), joined; then the dashboard, gRPC (with a grace period) and
        the metrics file. No thread runs native code while the interpreter exits (issue 25)."""
        if self.coordinator is not None:
            self.coordinator.begin_stop()
        stop_processes(self.procs)
        self.procs = []
        if self.coordinator is not None:
            self.coordinator.stop_background()
        if self.dashboard is not None:
            self.dashboard.stop()
            self.dashboard = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        elif self.coordinator is not None:
            self.coordinator.close()
