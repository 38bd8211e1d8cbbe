"""Resumable pulls (issue 23, item 4): a pull whose connection drops after some chunks goes on from
the next chunk on its retry, and the worker ends with the whole snapshot's codes bit for bit.

The connection is dropped by a TCP proxy on loopback that resets its first connection after half
of the snapshot's bytes (a stream of 4 KiB chunks), once the worker has read what had come: as on
a slow link, where the reader keeps up with the bytes that arrive."""

from __future__ import annotations

import pytest

from lte.worker.client import Worker
from tests.cluster import digits_job, running_server
from tests.faults import CuttingProxy


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
