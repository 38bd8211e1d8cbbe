"""``lte-worker``: train LoRA heads for an lte-server."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import signal
import sys
import textwrap
import threading

import torch

from lte.common.job.checks import OneLineArgumentParser, one_line_errors
from lte.common.job.precision import PRECISIONS
from lte.common.job.signals import stop_signals
from lte.worker.startup import TOKEN_HINT, check_resolves, check_worker_args, rpc_hint


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="lte-worker",
        description=textwrap.fill(
            "Join an lte-server job: train the LoRA heads it leases to this machine on a quantised copy "
            "of the model, push the factors back, repeat until the job ends.",
            79,
        ),
        epilog="example: lte-worker --server coordinator:50051 --device cuda:0 --max-heads 4\n\n"
        "exit codes:\n"
        "  0    the job finished\n"
        "  1    an error (the last line says which)\n"
        "  2    a bad flag, credential or data, or a lease it cannot train\n"
        "  4    the job was over before this worker trained a round\n"
        "  130  interrupted (Ctrl+C or SIGTERM)\n\n"
        "a worker that joins a full job stands by and takes heads as they free up",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", required=True, help="host:port of the lte-server gRPC endpoint")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, mps [auto]")
    parser.add_argument(
        "--max-heads",
        type=int,
        default=0,
        help="most heads to train at once (0: as many as the server gives)",
    )
    parser.add_argument(
        "--data", help="train on this data instead of the job's dataset (image folder or IDX folder)"
    )
    parser.add_argument("--data-dir", help="where the job's dataset lives (e.g. the Fashion-MNIST IDX files)")
    parser.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip (and count) image files that do not decode instead of stopping",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=2,
        help="DataLoader processes decoding streamed images ahead of training, 0 for none [2]",
    )
    parser.add_argument("--name", default="", help="label shown on the dashboard [hostname:pid]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="compute precision of the local steps: bf16 | fp16 (loss-scaled) autocast, fp32, or auto "
        "(bf16 on CUDA devices that support it, fp32 elsewhere) [the job's, which defaults to auto]",
    )
    parser.add_argument(
        "--no-frozen-cache",
        dest="frozen_cache",
        action="store_false",
        default=None,
        help="rebuild each layer's frozen weight (dequantised base, B'A' folded) twice per step instead "
        "of keeping it for the round (on by default on CUDA: one [m, n] per layer in the compute dtype)",
    )
    parser.add_argument(
        "--no-delta-snapshots",
        dest="delta_snapshots",
        action="store_false",
        help="pull every newer version as the whole snapshot, not as a delta of the codes this worker "
        "holds (saves that copy of the codes: about one byte per weight with --quant int8) [deltas on]",
    )
    parser.add_argument(
        "--give-up-after",
        type=float,
        default=300.0,
        help="seconds to keep retrying a server that does not answer, from the first failure "
        "(a transfer that moved bytes starts it again) [300]",
    )
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by lte-server --local-workers
    parser.add_argument(
        "--slow-down", type=float, default=0.0, help=argparse.SUPPRESS
    )  # tests: a slow worker
    parser.add_argument(
        "--fail-at-round", type=int, default=None, help=argparse.SUPPRESS
    )  # tests: SIGKILL itself after K pushes, before pushing again
    parser.add_argument(
        "--delay-push", type=float, default=0.0, help=argparse.SUPPRESS
    )  # tests: hold every push back this many seconds
    parser.add_argument(
        "--slow-factor", type=float, default=1.0, help=argparse.SUPPRESS
    )  # tests: take this many times as long per round (sleeps the difference)
    parser.add_argument(
        "--poison-push", default="", help=argparse.SUPPRESS
    )  # tests: a rogue worker (worker/hooks.py POISONS): scale=K | value=X | nan | layer=K, from push --poison-from
    parser.add_argument("--poison-from", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="stderr log lines [text]"
    )
    sec = parser.add_argument_group("security")
    sec.add_argument(
        "--token",
        help="the server's shared token, at least 16 characters (default: the LTE_TOKEN environment "
        "variable; prefer it, since other users can read command lines)",
    )
    sec.add_argument("--tls-ca", help="PEM CA that the server's certificate must chain to (enables TLS)")
    sec.add_argument("--tls-cert", help="PEM client certificate, for servers that require mutual TLS")
    sec.add_argument("--tls-key", help="PEM private key of the client certificate")
    return parser


def pick_device(name: str) -> str:
    """The torch device ``--device`` names; ValueError when this torch cannot use it."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: CUDA is not available (torch {torch.__version__}, "
            f"{'no CUDA build' if torch.version.cuda is None else 'no GPU visible'}); use --device cpu or auto"
        )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# every signal a handler may be installed for (common/job/signals.py says which ones are)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stopping(signum, frame) -> None:
    """A later stop signal while the worker leaves: nothing to do (see ``_interrupt``)."""


def _interrupt(signum, frame) -> None:
    # the first stop signal wins: a second one (Ctrl+C to the group, then the server's SIGTERM to
    # its local workers) must not raise again while the worker leaves or the interpreter exits. A
    # Python no-op, not SIG_IGN: a signal already pending when the handler became SIG_IGN makes
    # CPython print "OSError: Signal 15 ignored due to race condition" with a traceback
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stopping)
    raise KeyboardInterrupt


EXIT_BOUND_S = 20.0  # a stopping worker that is still running after this exits without more cleanup
FINAL_BOUND_S = 45.0  # ... and one whose interpreter shutdown hangs is ended by faulthandler (exit 1)


def _no_wakeup_fd() -> None:
    """In a forked child (a DataLoader process): a signal to it is not one to this worker, so its C
    handler must not write to the parent's wakeup pipe (a SIGTERM from the DataLoader's shutdown
    would stop the worker)."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing was inherited there
        signal.set_wakeup_fd(-1)


class StopWatch(threading.Thread):
    """Acts on the first stop signal from outside the main thread, so that no state of the worker
    can lose it.

    The main thread's handler raises KeyboardInterrupt, but Python drops an exception raised while it
    runs a ``__del__`` or a callback ("Exception ignored in ..."), and the handler ignores every later
    signal. This thread reads the signal numbers that CPython's C-level handler writes to a
    ``signal.set_wakeup_fd`` pipe at once, whatever the main thread is doing, and calls
    ``Worker.interrupt()`` (every wait ends, the next check raises ``Interrupted``). After
    ``EXIT_BOUND_S`` it prints one line and exits 130 with the threads' stacks in the log;
    ``faulthandler`` bounds a hang of the interpreter's shutdown itself, where no Python thread runs.
    """

    def __init__(self, exit_bound_s: float = EXIT_BOUND_S, final_bound_s: float = FINAL_BOUND_S) -> None:
        super().__init__(name="lte-stop-watch", daemon=True)
        self.exit_bound_s, self.final_bound_s = exit_bound_s, final_bound_s
        self.signum = 0
        self.worker = None  # the Worker to interrupt, once built
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        # main thread only (main() runs there); the C handler writes each signal's number to it
        self._old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        os.register_at_fork(after_in_child=_no_wakeup_fd)  # idempotent in effect: -1 in any child

    def close(self) -> None:
        """``main`` returns without a stop signal so far: stop watching (a command run in-process,
        e.g. by a test, leaves no thread or wakeup fd behind). After a signal the bounds stay armed."""
        if self.signum:
            return
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._write)  # the thread reads the end of the pipe and returns
        if self.is_alive():
            self.join(5.0)  # ended before the interpreter shuts down, not during it

    def attach(self, worker) -> None:
        """The worker to interrupt (at once when the signal came while it was being built)."""
        self.worker = worker
        if self.signum:
            worker.interrupt()

    def run(self) -> None:
        stops = {int(s) for s in STOP_SIGNALS}
        while not self.signum:
            got = os.read(self._read, 64)  # other handled signals (torch's SIGCHLD) wake it too
            if not got:  # closed: main() returned
                os.close(self._read)
                return
            self.signum = next((b for b in got if b in stops), 0)
        faulthandler.dump_traceback_later(self.final_bound_s, exit=True)
        worker = self.worker
        if worker is not None:
            worker.interrupt()
        threading.Event().wait(self.exit_bound_s)  # the process normally ends long before
        print(
            f"lte-worker: still running {self.exit_bound_s:g} s after {signal.Signals(self.signum).name}; "
            "exiting without more cleanup (the threads' stacks follow)",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        os._exit(130)


@one_line_errors("lte-worker")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_worker_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lte.common.job.logs import setup_logging

    setup_logging(args.log_format, "INFO", prog="lte-worker")
    watch = StopWatch()
    for sig in stop_signals():  # Ctrl+C, SIGTERM, a closed terminal (not under nohup): leave the job
        signal.signal(sig, _interrupt)
    watch.start()
    try:
        return _run(args, watch)
    except KeyboardInterrupt:  # before the worker was built (its run() is handled in _run)
        print("lte-worker: interrupted; stopped before joining the job", file=sys.stderr)
        return 130
    finally:
        watch.close()


def _run(args: argparse.Namespace, watch: StopWatch) -> int:
    from lte.common.wire.auth import bearer_metadata, channel_credentials, token_from
    from lte.worker.client import EXIT_JOB_OVER, Worker
    from lte.worker.hooks import FaultInjection

    try:
        metadata = bearer_metadata(token_from(args.token))
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        device = pick_device(args.device)
        # a mistyped host: exit 2 within seconds, not 300 s of retries (nor longer than --give-up-after)
        check_resolves(args.server, at_most_s=args.give_up_after)
    except (ValueError, OSError) as exc:
        print(f"lte-worker: error: {exc}", file=sys.stderr)
        return 2
    worker = Worker(
        args.server,
        device=device,
        max_heads=args.max_heads,
        data=args.data,
        data_dir=args.data_dir,
        skip_bad_images=args.skip_bad_images,
        loader_workers=args.loader_workers,
        name=args.name,
        quiet=args.quiet,
        give_up_after_s=args.give_up_after,
        parent_pid=args.parent_pid,
        hooks=FaultInjection(
            args.slow_down,
            args.fail_at_round,
            args.delay_push,
            args.slow_factor,
            poison=args.poison_push,
            poison_from=args.poison_from,
        ),
        credentials=credentials,
        tls_files=(args.tls_ca, args.tls_cert, args.tls_key),
        metadata=metadata,
        show_progress=args.log_format == "text",
        precision=args.precision,
        cache_frozen=args.frozen_cache,
        delta_snapshots=args.delta_snapshots,
    )
    watch.attach(worker)
    try:
        code = worker.run()
        if code == EXIT_JOB_OVER:
            print(
                "lte-worker: the job is over: the server finished training before this worker joined",
                file=sys.stderr,
            )
        return code
    except (ValueError, FileNotFoundError, ImportError) as exc:  # the data (or the job) cannot be used here
        print(f"lte-worker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        joined = "left the job" if worker.worker_id else "stopped before joining the job"
        print(f"lte-worker: interrupted; {joined}", file=sys.stderr)
        return 130
    except Exception as exc:  # a clear last word instead of a bare traceback for network errors
        import grpc

        if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            # a credential, as a bad flag: exit 2, one line, the hint once (the server's own text
            # names the header; the worker's user needs the flag)
            print(
                f"lte-worker: error: {args.server} refused the token (missing or wrong); {TOKEN_HINT}",
                file=sys.stderr,
            )
            return 2
        if isinstance(exc, grpc.RpcError):
            print(f"lte-worker: error: {exc.code().name}: {exc.details()}{rpc_hint(exc)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
