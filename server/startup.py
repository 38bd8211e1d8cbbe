"""lte-server's start-up checks: the effective settings, the credentials and the run folder.

Everything here runs before the server binds a port or leaves a folder behind. A refusal is a
:class:`~lte.common.job.checks.ConfigError` naming the option, the value and the allowed range.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import sys
import time
from pathlib import Path

from lte.common.job.checks import ConfigError, check_chunk_fits, check_pem, check_range, check_token
from lte.common.job.config import JobConfig, ServerSettings
from lte.common.wire import grpc_options
from lte.common.wire.auth import TOKEN_ENV, is_loopback


def effective_token(settings: ServerSettings) -> str | None:
    """The token in effect (``--token``, else ``$LTE_TOKEN``), checked; None when neither is set."""
    if settings.token:
        check_token(settings.token, source="--token")
        return settings.token
    env = os.environ.get(TOKEN_ENV)
    if env:
        check_token(env, source=TOKEN_ENV)
        return env
    return None


def check_server_settings(job: JobConfig, settings: ServerSettings) -> None:
    """The start-up checks of the settings that need more than their own fields (ranges and
    choices are checked when ``ServerSettings`` is built): the job, the environment and files.

    Raises ConfigError naming the first option at fault.
    """
    check_range("buffer_size", settings.buffer_size, low=0, high=job.heads, note="0 means N/4; at most N")
    token = effective_token(settings)
    if token is None and not is_loopback(settings.host):
        raise ConfigError(
            f"--host {settings.host}: serving off loopback needs a token (--token or {TOKEN_ENV}, "
            "at least 16 characters), or anyone who reaches the port could push updates"
        )
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    if settings.tls_ca and not settings.tls_cert:
        raise ConfigError("--tls-ca needs --tls-cert and --tls-key (mutual TLS is on top of TLS)")
    if settings.tls_cert:
        check_pem("tls_cert", settings.tls_cert, want="CERTIFICATE")
        check_pem("tls_key", settings.tls_key or "", want="PRIVATE KEY")
    if settings.tls_ca:
        check_pem("tls_ca", settings.tls_ca, want="CERTIFICATE")
    check_chunk_fits(job.max_chunk_bytes, grpc_options.MAX_MESSAGE_BYTES, side="server")
    if settings.resume and not Path(settings.resume).exists():
        raise ConfigError(f"--resume {settings.resume}: no such checkpoint or run folder")


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


def program(name: str) -> str:
    """How to name this environment's command ``name`` (``lte-server``, ``lte-worker``) in a printed
    command: ``name`` when the PATH this process was started with finds this very one (an activated
    ``.venv``), else its absolute path (``make cluster`` runs ``.venv/bin/lte-server`` with
    ``.venv/bin`` off the PATH, where a bare name is "command not found" or another install's)."""
    own = Path(sys.executable).absolute().parent / name
    if not own.is_file():
        return name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == own.resolve():
        return name
    return str(own)


def worker_hint(address: str, settings: ServerSettings, token: str | None) -> str:
    """The "start workers with: ..." line for a server at ``address`` (host:port): a command that
    works as pasted, quoted with ``shlex.join`` (a path with a space stays one argument). Over TLS
    it carries ``--tls-ca`` with the file the local workers trust (``--tls-ca``, else the server's
    own certificate), as an absolute path; what it cannot carry is named before the colon: the
    token (never printed: the worker reads ``$LTE_TOKEN``) and a client certificate (mutual TLS)."""
    argv = [program("lte-worker"), "--server", address]
    if settings.tls_cert:
        argv += ["--tls-ca", str(Path(settings.tls_ca or settings.tls_cert).resolve())]
    needs = []
    if token:
        needs.append(f"the server's token in {TOKEN_ENV}")
    if settings.tls_ca:
        needs.append("--tls-cert and --tls-key of a client certificate that chains to --tls-ca")
    return (
        "start workers"
        + (f" (they need {' and '.join(needs)})" if needs else "")
        + f" with: {shlex.join(argv)}"
    )
