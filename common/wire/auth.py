"""Credentials both sides share: the bearer token and TLS channel credentials (no sockets here)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import grpc

from lte.common.job.checks import check_token

TOKEN_ENV = "LTE_TOKEN"


def token_from(flag: str | None) -> str | None:
    """The token given on the command line, else in the environment, else none."""
    token = flag if flag else os.environ.get(TOKEN_ENV) or None
    if token is not None:  # at least 16 visible ASCII characters: ConfigError names the source
        check_token(token, source="--token" if flag else TOKEN_ENV)
    return token


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS to the server (verified against ``ca``), with a client certificate for mutual TLS."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )
