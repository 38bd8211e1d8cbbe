"""Every gRPC channel and server option of the project, in one place.

Each constant can be overridden from the environment (``LTE_GRPC_<NAME>``), so an operator can
tune a deployment without a code change. Nothing here opens a socket.
"""

from __future__ import annotations

import os


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(f"LTE_GRPC_{name}")
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"LTE_GRPC_{name} must be an integer, got {raw!r}") from None


# A message carries at most one tensor chunk plus a little metadata.
MAX_CHUNK_BYTES = _env_int("MAX_CHUNK_BYTES", 1 << 20)
MAX_MESSAGE_BYTES = _env_int("MAX_MESSAGE_BYTES", MAX_CHUNK_BYTES + (1 << 16))
# An upper bound on one push (factors of every head of a worker plus replica deltas).
MAX_PUSH_BYTES = _env_int("MAX_PUSH_BYTES", 2 << 30)
KEEPALIVE_TIME_MS = _env_int("KEEPALIVE_TIME_MS", 20_000)
KEEPALIVE_TIMEOUT_MS = _env_int("KEEPALIVE_TIMEOUT_MS", 10_000)
SERVER_THREADS = _env_int("SERVER_THREADS", 64)
# Reconnect backoff a channel applies by itself between connection attempts.
INITIAL_RECONNECT_BACKOFF_MS = _env_int("INITIAL_RECONNECT_BACKOFF_MS", 500)
MAX_RECONNECT_BACKOFF_MS = _env_int("MAX_RECONNECT_BACKOFF_MS", 5_000)


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),  # two servers must never share a port by accident
    ]


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def make_server(threads: int, interceptors: list | None = None):
    """A gRPC server with these options, ``threads`` handler threads and a bounded queue of RPCs."""
    from concurrent import futures

    import grpc

    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lte-rpc"),
        options=server_options(),
        maximum_concurrent_rpcs=threads * 4,
        interceptors=interceptors or [],
    )


def make_channel(address: str, credentials=None):
    """A channel to ``address`` with these options; TLS when ``credentials`` are given."""
    import grpc

    if credentials is not None:
        return grpc.secure_channel(address, credentials, channel_options())
    return grpc.insecure_channel(address, channel_options())
