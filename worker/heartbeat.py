"""The lease's heartbeat: a thread that tells the server every ``interval_s`` seconds that the
worker lives (its version, speed and state), and keeps the server's newest view of the lease (its
heads, its epoch, whether the job is done) for the worker to adopt between turns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from lte.common.wire.protocol import REREGISTER
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.worker.rpc import RpcCaller, refusal


class Heartbeat:
    """``request()`` builds each beat from the worker's state now; ``stub()`` is the worker's stub
    (read at each beat: a benchmark may wrap the channel after the worker is built). A reply that
    says the job is done sets the worker's ``stop``; a refusal that the lease is gone sets
    ``lease_lost`` (the worker registers again)."""

    def __init__(
        self,
        rpc: RpcCaller,
        request: Callable[[], pb.HeartbeatRequest],
        stub: Callable[[], pb_grpc.ParameterServerStub],
    ) -> None:
        self.rpc, self.request, self.stub = rpc, request, stub
        self.interval_s = 5.0  # the server's, from registration on
        self.view: pb.HeartbeatReply | None = None  # the newest lease view a heartbeat brought
        self.lease_lost = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once; it runs until the worker's ``stop``)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self.loop, name="lte-heartbeat", daemon=True)
            self.thread.start()

    def loop(self) -> None:
        """Beat every ``interval_s`` until the worker's ``stop``; a failed beat is not retried (the next one is)."""
        while not self.rpc.stop.wait(self.interval_s):
            try:
                reply = self.stub().Heartbeat(
                    self.request(), metadata=self.rpc.metadata, timeout=max(1.0, self.interval_s)
                )
                self.view = reply
                if reply.done:
                    self.rpc.stop.set()
            except grpc.RpcError as err:
                if refusal(err) in REREGISTER:
                    self.lease_lost.set()

    def lease_view(self, epoch: int, *, force: bool = False) -> pb.HeartbeatReply:
        """The server's view of the lease: the newest beat's when it is of ``epoch``, else (or with
        ``force``) asked for now, by a heartbeat call that ``rpc`` retries."""
        view = self.view
        if force or view is None or view.lease_epoch != epoch:
            view = self.rpc.call(self.stub().Heartbeat, self.request(), what="heartbeat", timeout=30)
        return view

    def join(self) -> None:
        """Wait for the thread to end after ``stop`` (never close the channel under a beat in flight)."""
        if self.thread is not None:
            self.thread.join(timeout=max(1.0, self.interval_s) + 1.0)
