"""lte-server's start-up checks: the effective settings, the credentials and the run folder.

Everything here runs before the server binds a port or leaves a folder behind. A refusal is a
:class:`~lte.common.checks.ConfigError` naming the option, the value and the allowed range.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from lte.common.auth import TOKEN_ENV, is_loopback
from lte.common.checks import (
    ConfigError,
    check_choice,
    check_chunk_fits,
    check_pem,
    check_range,
    check_token,
    flag,
)
from lte.common.config import SERVER_TYPES  # noqa: F401 (re-exported: server.cli, tests)
from lte.server.guard import GUARD_MODES

# the server keys of a config file live beside the job's (lte-sim reads a run's file too)


def effective_token(srv: dict[str, Any]) -> str | None:
    """The token in effect (``--token``, else ``$LTE_TOKEN``), checked; None when neither is set."""
    if srv.get("token"):
        check_token(srv["token"], source="--token")
        return srv["token"]
    env = os.environ.get(TOKEN_ENV)
    if env:
        check_token(env, source=TOKEN_ENV)
        return env
    return None


def check_server_settings(job: Any, srv: dict[str, Any]) -> None:
    """One pass over the effective server settings (flags, file and defaults alike).

    ``job``: the JobConfig; ``srv``: the resolved settings of ``lte.server.cli.resolve_server``.
    Raises ConfigError naming the first option out of range.
    """
    from lte.common import grpc_options

    check_choice("update_guard", srv.get("update_guard") or "refuse", GUARD_MODES)  # a config file's too
    check_range("port", srv["port"], low=0, high=65535, note="0 picks a free one")
    check_range("dashboard_port", srv["dashboard_port"], low=-1, high=65535, note="0 a free one, -1 none")
    check_range("heads_per_worker", srv["heads_per_worker"], low=0, note="0 means N / local workers, or N")
    check_range("local_workers", srv["local_workers"], low=0)
    check_range("lease_timeout", srv["lease_timeout"], low=0, low_open=True, note="seconds")
    check_range("heartbeat_interval", srv["heartbeat_interval"], low=0, low_open=True, note="seconds")
    factor = srv["straggler_factor"]
    if not math.isfinite(factor):
        raise ConfigError(f"--straggler-factor {factor}: must be a finite number (0 turns the rule off)")
    check_range("straggler_factor", factor, low=0, note="x the median round time; 0 turns the rule off")
    if srv["heartbeat_interval"] >= srv["lease_timeout"]:
        raise ConfigError(
            f"--heartbeat-interval {srv['heartbeat_interval']:g}: must be below --lease-timeout "
            f"{srv['lease_timeout']:g}, or every lease expires between two heartbeats"
        )
    check_range("max_staleness", srv["max_staleness"], low=0)
    check_range("buffer_size", srv["buffer_size"], low=0, high=job.heads, note="0 means N/4; at most N")
    check_range("eval_every", srv["eval_every"], low=-1, note="0 only at the end, -1 automatic")
    check_range("checkpoint_every", srv["checkpoint_every"], low=-1, note="0 never, -1 automatic")
    check_range("keep_checkpoints", srv["keep_checkpoints"], low=1)
    check_range("linger", srv["linger"], low=-1, note="seconds; -1 until Ctrl+C on a terminal")
    check_range("threads", srv["threads"], low=0, note="0 is torch's default")
    if srv["rpc_threads"] != 0:
        check_range(
            "rpc_threads", srv["rpc_threads"], low=2, note="the gRPC server needs at least 2 handler threads"
        )
    for key in ("host", "dashboard_host", "device", "worker_device"):
        if not str(srv[key]).strip():
            raise ConfigError(f"{flag(key)} {srv[key]!r}: must not be empty")
    token = effective_token(srv)
    if token is None and not is_loopback(srv["host"]):
        raise ConfigError(
            f"--host {srv['host']}: serving off loopback needs a token (--token or {TOKEN_ENV}, "
            "at least 16 characters), or anyone who reaches the port could push updates"
        )
    if bool(srv["tls_cert"]) != bool(srv["tls_key"]):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if srv["tls_ca"] and not srv["tls_cert"]:
        raise ConfigError("--tls-ca needs --tls-cert and --tls-key (mutual TLS is on top of TLS)")
    if srv["tls_cert"]:
        check_pem("tls_cert", srv["tls_cert"], want="CERTIFICATE")
        check_pem("tls_key", srv["tls_key"], want="PRIVATE KEY")
    if srv["tls_ca"]:
        check_pem("tls_ca", srv["tls_ca"], want="CERTIFICATE")
    check_chunk_fits(job.max_chunk_bytes, grpc_options.MAX_MESSAGE_BYTES, side="server")
    if srv["resume"] and not Path(srv["resume"]).exists():
        raise ConfigError(f"--resume {srv['resume']}: no such checkpoint or run folder")


def default_run_folder() -> Path:
    """``runs/<time>-<4 random hex>``: two servers started in the same second get two folders."""
    while True:
        folder = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        if not folder.exists():
            return folder


def prepare_run_folder(out: str | None) -> tuple[Path, bool]:
    """Make the run folder and prove it writable (a probe file written and removed).

    Returns ``(folder, created)``: ``created`` when this call made it (so a failed start may remove
    it again). Raises ConfigError naming ``--out``.
    """
    folder = Path(out) if out else default_run_folder()
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"lte")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if created:
            discard_run_folder(folder, True)
        raise ConfigError(
            f"--out {folder}: the run folder is not writable ({reason}); pick another folder with --out"
        ) from None
    return folder, created


def discard_run_folder(folder: Path, created: bool) -> None:
    """Remove a run folder that a failed start made (never one that existed before)."""
    if created:
        shutil.rmtree(folder, ignore_errors=True)
        parent = folder.parent  # a default runs/ made just now, left empty
        if parent.name == "runs":
            with contextlib.suppress(OSError):
                parent.rmdir()


# Python puts the working folder first on a ``-c`` child's path, so a folder named ``lte/`` there
# would shadow the package (even last on the path: an editable install's finder runs after it).
# The boot line drops it, as the lte-server console script never had it: both resolve
# --model package.module:factory through PYTHONPATH alike.
# lte is imported with the cwd off sys.path (a ./lte folder cannot shadow the package), then the cwd
# goes back on it, as for `python -m`: a --model package.module:factory in the cwd still imports.
WORKER_BOOT = (
    "import sys\n"
    "cwd = sys.path[0] == '' and sys.path.pop(0) == ''\n"
    "from lte.worker.cli import main\n"
    "if cwd:\n"
    "    sys.path.insert(0, '')\n"
    "sys.exit(main())\n"
)


def local_worker_command(python: str, address: str) -> list[str]:
    """The command line of one local ``lte-worker`` that a ``./lte`` folder in the cwd cannot shadow."""
    return [python, "-c", WORKER_BOOT, "--server", address]
