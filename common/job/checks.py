"""Start-up checks of the effective configuration, shared by lte-sim, lte-server and lte-worker.

One pass over what a run will actually use (flags, config file and defaults alike), before any
folder is made or socket opened. Every refusal is a :class:`ConfigError` whose message names the
option, the value given and what is allowed; the commands print it on one line and exit 2.
Nothing here imports torch or opens a socket.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A value a run cannot use. The message names the option, the value and the allowed range."""


def flag(key: str) -> str:
    """The command-line spelling of a configuration key: ``heads_per_worker`` -> ``--heads-per-worker``."""
    return "--" + key.replace("_", "-")


# -- the config file ----------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML config file, refusing a missing file or bad syntax with the file's name.

    Raises ConfigError. Returns the parsed (still nested) document.
    """
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(f"--config {path}: not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None


# a TOML value's type in words: what a key expects, and what a file gave
_TYPE_WORDS = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a table",
    list: "an array",
}


def _type_word(kind: type) -> str:
    return _TYPE_WORDS.get(kind, kind.__name__)


def coerce_types(values: dict[str, Any], types: dict[str, type], *, source: str) -> dict[str, Any]:
    """Check each value against the type its key expects; an int passes where a float is expected.

    ``types`` maps a key to ``int``, ``float``, ``str`` or ``bool``; keys not in it are left as
    they are. Returns a copy with ints widened to floats where a float is expected.
    Raises ConfigError naming the key, the value and the type it needs.
    """
    out = dict(values)
    for key, value in values.items():
        want = types.get(key)
        if want is None or value is None:
            continue
        if want is tuple:  # a list of names (e.g. classes): a TOML array
            if not isinstance(value, (list, tuple)):
                raise ConfigError(
                    f"{source}: key '{key}' must be a list, got {value!r} ({_type_word(type(value))})"
                )
            out[key] = tuple(value)
            continue
        ok = (
            isinstance(value, bool)
            if want is bool
            else (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                if want is float
                else isinstance(value, want) and not isinstance(value, bool)
            )
        )
        if not ok:
            raise ConfigError(
                f"{source}: key '{key}' must be {_type_word(want)}, got {value!r} ({_type_word(type(value))})"
            )
        if want is float:
            out[key] = float(value)
    return out


# -- ranges -------------------------------------------------------------------------------------


def check_range(
    key: str,
    value: float | int,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    note: str = "",
) -> None:
    """Refuse ``value`` outside ``[low, high]`` (``(low, high]`` with ``low_open``), naming the option."""
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and value > high
    )
    if not bad:
        return
    if low is not None and high is not None:
        allowed = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        allowed = f"in {allowed}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"<= {high:g}"
    raise ConfigError(f"{flag(key)} {value!r}: must be {allowed}{'; ' + note if note else ''}")


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{flag(key)} {value!r}: must be one of {', '.join(choices)}")


# -- the model name -----------------------------------------------------------------------------


def check_model_name(name: str, zoo: Iterable[str]) -> None:
    """Refuse a model that no process could build: an unknown zoo name or a factory that does not import.

    ``zoo``: the zoo's names (``lte.common.job.models.MODEL_NAMES``). A ``package.module:factory``
    spec is imported here, so a typo is found before any worker joins.
    Raises ConfigError.
    """
    zoo = tuple(zoo)
    if name.startswith("hf:"):
        # lazy: hf imports torch, and checks is torch-free for lte-eval's start (commands/eval.py)
        from lte.common.core.hf import HFError, check_hf_model

        try:
            check_hf_model(name)
        except HFError as exc:
            raise ConfigError(str(exc)) from None
        return
    if ":" not in name:
        if name.lower().replace("_", "-") not in zoo:
            raise ConfigError(
                f"--model {name!r}: unknown model; choose one of {', '.join(zoo)} or package.module:factory"
            )
        return
    import importlib

    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--model {name!r}: a custom model must look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--model {name!r}: cannot import module '{module_name}' ({exc}); "
            "install it or put its folder on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module raised while importing: its error, in one line
        raise ConfigError(
            f"--model {name!r}: importing '{module_name}' failed: {type(exc).__name__}: {exc}"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"--model {name!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise ConfigError(f"--model {name!r}: '{attr}' is not callable")


# -- the network ---------------------------------------------------------------------------------

TOKEN_MIN_LENGTH = 16
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a gRPC metadata value carries as is


def check_token(token: str, *, source: str) -> None:
    """Refuse a token that gRPC metadata cannot carry or that is too short to be a secret.

    ``source`` names where it came from (``--token`` or ``LTE_TOKEN``). Raises ConfigError.
    """
    hint = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if len(token) < TOKEN_MIN_LENGTH:
        raise ConfigError(
            f"{source}: the token must be at least {TOKEN_MIN_LENGTH} characters long (got {len(token)}); {hint}"
        )
    if not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(
            f"{source}: the token may hold only visible ASCII characters (no spaces, no accents), "
            f"which is what gRPC metadata carries; {hint}"
        )


def parse_server_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); refuse a missing or out-of-range port.

    Raises ConfigError naming ``--server``. Returns ``(host, port)``.
    """
    example = "e.g. --server coordinator:50051 or --server [::1]:50051"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise ConfigError(f"--server {text!r}: unclosed '[' in the address; {example}")
    else:
        host, _, port_text = text.rpartition(":")
        if host.count(":"):  # a bare IPv6 address: its last group is not a port
            raise ConfigError(f"--server {text!r}: write an IPv6 address in brackets; {example}")
    if not host or not port_text:
        raise ConfigError(f"--server {text!r}: needs host:port (the server prints its port); {example}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"--server {text!r}: the port must be an integer in [1, 65535]; {example}")
    return host, int(port_text)


# how much a tensor-chunk message carries besides the chunk's bytes (names, shapes, header)
CHUNK_MESSAGE_OVERHEAD = 1 << 16


def check_chunk_fits(max_chunk_bytes: int, max_message_bytes: int, *, side: str) -> None:
    """Refuse a chunk size the gRPC message limit cannot carry (found at start-up, not by failing pushes).

    ``side``: the process whose limit this is (its env var ``LTE_GRPC_MAX_MESSAGE_BYTES`` sets it).
    Raises ConfigError.
    """
    if max_chunk_bytes + CHUNK_MESSAGE_OVERHEAD > max_message_bytes:
        raise ConfigError(
            f"max_chunk_bytes {max_chunk_bytes}: a chunk plus {CHUNK_MESSAGE_OVERHEAD} bytes of header does "
            f"not fit this {side}'s gRPC message limit of {max_message_bytes} bytes "
            f"(LTE_GRPC_MAX_MESSAGE_BYTES); lower max_chunk_bytes to at most "
            f"{max_message_bytes - CHUNK_MESSAGE_OVERHEAD} or raise the limit"
        )


def check_pem(key: str, path: str, *, want: str) -> None:
    """Refuse a credential file that is missing, unreadable or not PEM of the expected kind.

    ``want``: ``"CERTIFICATE"`` or ``"PRIVATE KEY"``. Raises ConfigError naming the option.
    """
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{flag(key)} {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{flag(key)} {path}: cannot read it ({exc.strerror})") from None
    begins = [line for line in text.splitlines() if line.startswith(b"-----BEGIN ")]
    if not any(want.encode() in line for line in begins):
        raise ConfigError(f"{flag(key)} {path}: not a PEM file holding a {want.lower()}")
    if want == "CERTIFICATE":
        check_certificate_dates(key, path, text)


def check_certificate_dates(key: str, path: str, text: bytes, now: datetime.datetime | None = None) -> None:
    """Refuse a PEM file holding a certificate that has expired or is not valid yet (RFC 5280
    section 4.1.2.5: notBefore <= now <= notAfter), naming the certificate and the date: a TLS peer
    would refuse it at every handshake, and the error there does not say why. ConfigError."""
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(text)
    except ValueError as exc:
        raise ConfigError(f"{flag(key)} {path}: the certificate does not parse ({exc})") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    for cert in certificates:
        subject = cert.subject.rfc4514_string() or "(no subject)"
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now < start:
            raise ConfigError(
                f"{flag(key)} {path}: certificate {subject} is not valid before "
                f"{start:%Y-%m-%d %H:%M:%S} UTC (now {now:%Y-%m-%d %H:%M:%S} UTC): check this machine's "
                "clock, or issue one valid now"
            )
        if now > end:
            raise ConfigError(
                f"{flag(key)} {path}: certificate {subject} expired on {end:%Y-%m-%d %H:%M:%S} UTC "
                f"(now {now:%Y-%m-%d %H:%M:%S} UTC): renew it"
            )


# -- errors nobody expected ------------------------------------------------------------------------


def trace_path(prog: str) -> Path:
    """Where an unexpected error's full traceback goes: ``$LTE_TRACE_DIR`` or the temp folder."""
    folder = Path(os.environ.get("LTE_TRACE_DIR") or tempfile.gettempdir())
    return folder / f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.trace"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, whose errors (an unknown flag, a bad choice, a missing value) are one line and exit
    2: ``lte-server: error: argument --mode: invalid choice: 'foo' (choose from ...)``; argparse's
    own prints the whole usage first (40 lines for lte-server). ``--help`` still prints it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a command's ``main``: a ConfigError exits 2 with its message; any other exception
    prints one line naming the file that holds the full traceback, and exits 1.

    KeyboardInterrupt and SystemExit pass through (the commands handle them themselves).
    """

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except ConfigError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return 2
            except Exception as exc:
                path = trace_path(prog)
                where = str(path)
                try:
                    path.write_text(traceback.format_exc())
                except OSError:
                    where = "nowhere: the trace file could not be written"
                message = " ".join(str(exc).split()) or "(no message)"
                print(
                    f"{prog}: error: unexpected {type(exc).__name__}: {message} (full trace: {where})",
                    file=sys.stderr,
                )
                return 1

        return guarded

    return wrap
