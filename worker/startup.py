"""lte-worker's start-up checks: its flags and credentials, before it dials the server."""

from __future__ import annotations

import argparse
import math
import socket
import time
from pathlib import Path

import grpc

from lte.common.job.checks import ConfigError, check_pem, check_range, parse_server_address
from lte.common.wire.auth import TOKEN_ENV


def check_worker_args(args: argparse.Namespace) -> None:
    """One pass over the worker's flags. Raises ConfigError naming the first bad option."""
    parse_server_address(args.server)
    check_range("max_heads", args.max_heads, low=0, note="0 takes as many as the server gives")
    check_range("threads", args.threads, low=0, note="0 is torch's default")
    check_range("give_up_after", args.give_up_after, low=0, low_open=True, note="a time in seconds")
    for key in ("data", "data_dir"):  # found now, not after joining a job and leasing its heads
        folder = getattr(args, key)
        if folder and not Path(folder).is_dir():
            raise ConfigError(f"--{key.replace('_', '-')} {folder}: no such folder")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
    if args.tls_ca:
        check_pem("tls_ca", args.tls_ca, want="CERTIFICATE")
    if args.tls_cert:
        check_pem("tls_cert", args.tls_cert, want="CERTIFICATE")
        check_pem("tls_key", args.tls_key, want="PRIVATE KEY")


TOKEN_HINT = f"give the server's token with --token or the {TOKEN_ENV} environment variable"


def rpc_hint(err: grpc.RpcError) -> str:
    """What the user can do about a refusal, appended to its one line."""
    code = err.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f" ({TOKEN_HINT})"
    if code == grpc.StatusCode.UNAVAILABLE:
        return " (is lte-server running, and are --server's host and port the ones it printed?)"
    return ""


RESOLVE_BOUND_S = 10.0  # a name that does not resolve for this long is a typo, not an outage


def check_resolves(
    address: str, bound_s: float = RESOLVE_BOUND_S, poll_s: float = 1.0, *, at_most_s: float = math.inf
) -> None:
    """The host of ``--server host:port`` resolves, within ``bound_s`` seconds or ``at_most_s`` (the
    worker's --give-up-after), whichever is shorter (a DNS answer that comes late, e.g. a container
    name being registered, is waited for; an outage of the server itself is not this check's
    business: the worker retries that for --give-up-after).

    Raises ConfigError naming the host (issue 25: a mistyped name was retried for 300 s).
    """
    host, port = parse_server_address(address)
    bound_s = min(bound_s, at_most_s)
    deadline = time.monotonic() + bound_s
    while True:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return
        except (socket.gaierror, UnicodeError) as exc:
            if time.monotonic() + poll_s > deadline:
                reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
                raise ConfigError(
                    f"--server {address}: the host name {host!r} does not resolve ({reason}, "
                    f"for {bound_s:g} s); check its spelling, or give the server's IP address"
                ) from None
            time.sleep(poll_s)  # a retry against the deadline above


class TLSProblem(ValueError):
    """The TLS handshake with the server fails for a reason in a certificate (named in the message)."""


def tls_problem(
    address: str, ca: str | None, cert: str | None, key: str | None, timeout_s: float = 10.0
) -> str | None:
    """Why a TLS handshake with ``address`` fails, from Python's own handshake (gRPC's error says only
    that it failed): the verification message (expired, not yet valid, another CA, another host
    name) and the server certificate's dates. None when the handshake succeeds or the server cannot
    be reached at all (then the address is the problem, not a certificate)."""
    import socket
    import ssl

    host, port = parse_server_address(address)
    context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if cert and key:
        context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        trusted = f"--tls-ca {ca}" if ca else "the system's CAs (no --tls-ca given)"
        return (
            f"TLS: the server's certificate at {address} did not verify against {trusted}: "
            f"{exc.verify_message}{_peer_dates(host, port, timeout_s)}"
        )
    except ssl.SSLError as exc:
        return f"TLS: the handshake with {address} failed: {exc.reason or exc} (check --tls-ca, --tls-cert, --tls-key)"
    except OSError:
        return None


def _peer_dates(host: str, port: int, timeout_s: float) -> str:
    """`` (valid <from> to <until> UTC)`` of the server's certificate, read without verifying it."""
    import socket
    import ssl

    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        if der is None:
            return ""
        cert = x509.load_der_x509_certificate(der)
    except (OSError, ValueError, TypeError):
        return ""
    return (
        f" (the certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} "
        f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)"
    )
