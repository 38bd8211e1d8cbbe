"""The gRPC server: the ``lte.v1.ParameterServer`` service (with health and reflection) on a port, the
scheduler's clock thread and the evaluator. (The web app is ``server/dashboard.py``.)"""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lte.common.wire import grpc_options
from lte.common.wire.auth import is_loopback
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server.coordinator import Coordinator
from lte.server.security import TokenAuthInterceptor
from lte.server.service import ParameterServerService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ParameterServer:
    """Serves a ``Coordinator`` over gRPC on ``host:port`` (port 0: any free port, see ``.port``)."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int | None = None,
        token: str | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        if not token and not is_loopback(host):
            raise ValueError(
                f"refusing to serve on {host} without a token: anyone who reaches the port could push updates; "
                "pass --token (or set LTE_TOKEN), or bind 127.0.0.1"
            )
        self.coordinator = coordinator
        self.token, self.credentials = token, credentials
        self.host, self.requested_port = host, port
        self.threads = threads or grpc_options.SERVER_THREADS
        if self.threads < 2:
            raise ValueError(
                f"the gRPC server needs at least 2 handler threads (a long-poll and a push), got {self.threads}"
            )
        self.port = 0
        self.service: ParameterServerService | None = None  # set by start()
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._stop = threading.Event()
        self._scheduler_clock: threading.Thread | None = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def start(self) -> ParameterServer:
        server = grpc_options.make_server(
            self.threads, [TokenAuthInterceptor(self.token)] if self.token else []
        )
        # a quarter of the threads (at least 2) stay free of long-polls, for pushes and heartbeats
        service = ParameterServerService(
            self.coordinator, max_waiting_pulls=max(1, self.threads - max(2, self.threads // 4))
        )
        self.service = service
        pb_grpc.add_ParameterServerServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            address = format_address(self.host, self.requested_port)
            if self.credentials is not None:
                self.port = server.add_secure_port(address, self.credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(
                f"cannot listen on {format_address(self.host, self.requested_port)}: {exc}"
            ) from None
        if self.port == 0:
            raise OSError(
                f"cannot listen on {format_address(self.host, self.requested_port)}: address in use or not local"
            )
        server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._scheduler_clock = threading.Thread(target=self._tick, name="lte-scheduler-clock", daemon=True)
        self._scheduler_clock.start()
        self.coordinator.evaluations.start()
        return self

    def _tick(self) -> None:
        # the scheduler's clock: lease expiry, stragglers and free heads are looked at this often
        c = self.coordinator
        interval = max(0.05, min(c.lease_timeout_s / 4, c.heartbeat_interval_s / 2))
        while not self._stop.wait(interval):
            c.run_scheduler()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until the job has trained its last round (or the timeout)."""
        c = self.coordinator
        with c.changed:
            return c.changed.wait_for(lambda: c.done, timeout)

    def stop(self, grace: float = 2.0) -> None:
        self._stop.set()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            # bounded: gRPC sometimes never reports the end of a bidi call whose request failed to
            # deserialize (seen with reflection under fuzzing), and shutdown must not hang on it
            self._server.stop(grace).wait(grace + 5.0)
            self._server = None
        self.coordinator.close()

    def __enter__(self) -> ParameterServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
