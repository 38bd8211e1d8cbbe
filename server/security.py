"""Shared-token authentication and TLS for the gRPC server.

The token travels as metadata ``authorization: Bearer <token>`` and is compared in constant
time on every RPC. The standard health service is exempt so that load balancers and Kubernetes
probes (which cannot send metadata) can reach it; it reveals nothing but SERVING / NOT_SERVING.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
DENIED = (
    "missing or wrong token: send 'authorization: Bearer <token>' "
    "(lte-worker: --token or the LTE_TOKEN environment variable)"
)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC without the right bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request, context: grpc.ServicerContext):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                DENIED,
            )

        def deny_stream(request_iterator, context: grpc.ServicerContext):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                DENIED,
            )

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny_stream),
            (True, True): grpc.stream_stream_rpc_method_handler(deny_stream),
        }

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        sent = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                sent = value.encode() if isinstance(value, str) else value
                break
        if hmac.compare_digest(sent, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED after the auth check fails
            return self._deny[(False, False)]
        return self._deny[(handler.request_streaming, handler.response_streaming)]


def server_credentials(cert: str | None, key: str | None, ca: str | None) -> grpc.ServerCredentials | None:
    """TLS when a certificate and key are given; mutual TLS (client certificates required) with a CA."""
    if not cert and not key:
        if ca:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    root = Path(ca).read_bytes() if ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)
