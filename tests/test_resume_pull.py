"""Resumable pulls (issue 23, item 4): a pull whose connection drops after some chunks goes on from
the next chunk on its retry, and the worker ends with the whole snapshot's codes bit for bit.

The connection is dropped by a TCP proxy on loopback that resets its first connection after half
of the snapshot's bytes (a stream of 4 KiB chunks), once the worker has read what had come: as on
a slow link, where the reader keeps up with the bytes that arrive."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import pytest

from lte.worker.client import Worker
from tests.cluster import digits_job, running_server
from tests.faults import wait_until

TIMEOUT_S = 120


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``target``. Its first connection passes ``cut_after`` bytes
    from the target, then holds the rest until ``read_enough()`` is true, calls ``on_cut`` and
    resets the connection; later connections pass untouched."""

    def __init__(self, target: str, cut_after: int, read_enough, on_cut=lambda: None) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.cut_after, self.read_enough, self.on_cut = cut_after, read_enough, on_cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.cut = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target, timeout=30)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            first = self.connections == 0
            self.connections += 1
            self._spawn(self._pump, client, upstream, None)
            self._spawn(self._pump, upstream, client, self.cut_after if first else None)

    def _pump(self, src: socket.socket, dst: socket.socket, cut_after: int | None) -> None:
        moved = 0
        try:
            while data := src.recv(1 << 14):
                if cut_after is not None and moved + len(data) >= cut_after:
                    dst.sendall(data[: cut_after - moved])
                    wait_until(self.read_enough, TIMEOUT_S, "the worker to read the bytes before the cut")
                    self.on_cut()
                    for s in (src, dst):  # a reset, as a dropped link's TCP ends: no orderly close
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    self.cut.set()
                    return
                dst.sendall(data)
                moved += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            s.close()
        for thread in self._threads:
            thread.join(timeout=30)


def _codes_of_a_whole_pull(address: str) -> tuple[int, dict[str, bytes], int]:
    worker = Worker(address, quiet=True)
    try:
        worker.register()  # Register + the whole snapshot
        return worker.version, dict(worker.puller.codes), worker.bytes_down
    finally:
        worker.leave()
        worker.stop.set()
        worker.channel.close()


@pytest.mark.server
@pytest.mark.parametrize("server_keeps_stream", [True, False])
def test_a_pull_cut_mid_stream_resumes_after_the_chunks_it_has(server_keeps_stream):
    # 4 KiB chunks: the digits MLP's int8 snapshot is a few dozen of them
    job = digits_job(heads=2, steps=40, quant="int8", max_chunk_bytes=4096)
    with running_server(job, heads_per_worker=1, lease_timeout_s=600) as server:
        version, whole, whole_bytes = _codes_of_a_whole_pull(server.address)
        assert whole_bytes > 8 * 4096, whole_bytes  # many chunks: a cut falls inside the stream
        # a server that restarted (or restored a checkpoint) no longer has the stream: from the start
        forget = server.coordinator.snapshots.invalidate if not server_keeps_stream else lambda: None
        worker: Worker | None = None
        proxy = CuttingProxy(
            server.address,
            cut_after=whole_bytes // 2,
            read_enough=lambda: worker is not None and worker.bytes_down >= whole_bytes // 4,
            on_cut=forget,
        )
        worker = Worker(proxy.address, quiet=True)
        try:
            worker.register()  # the first pull breaks half-way; register retries it
            assert proxy.cut.is_set() and proxy.connections >= 2
            assert worker.version == version
            assert worker.puller.codes == whole  # the snapshot's codes, bit for bit
            if server_keeps_stream:
                assert worker.puller.resumed_pulls == 1
                # the retry sent only what was missing (a chunk that was cut arrives again)
                assert worker.bytes_down < 1.1 * whole_bytes, (worker.bytes_down, whole_bytes)
            else:
                assert worker.puller.resumed_pulls == 0
                assert worker.bytes_down > 1.2 * whole_bytes, (worker.bytes_down, whole_bytes)
        finally:
            worker.stop.set()
            worker.leave()
            worker.channel.close()
            proxy.close()
