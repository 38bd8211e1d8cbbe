"""Resumable pushes (issue 23, item 4; wire protocol 3): a push whose connection drops half-way
goes on from the chunks the server holds, and the job ends with the very model of a job whose push
was not cut, bit for bit.

The connection is cut by a TCP proxy on loopback that resets it after half of a push's bytes
reached the server (4 KiB chunks), once the server has read what had come. Without the chunks
kept (a restarted server holds none), the retry sends the push whole, as before."""

from __future__ import annotations

import threading

import grpc
import pytest

from lte.common.wire.chunks import TensorAssembler, WireError
from lte.common.wire.protocol import Refusal, Refused
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server.partial_pushes import CHUNK_OVERHEAD, PartialPushes, push_identity
from lte.worker.client import Worker
from tests.cluster import digits_job, run_in_thread, running_server
from tests.faults import SYNTHETIC, CuttingProxy, master_hash, push_messages, random_factors, wait_until

TIMEOUT_S = 180
# one worker trains both heads: each sync round is closed by one push of about 60 chunks
JOB = dict(heads=2, steps=40, merge_every=10, uplink="fp32", max_chunk_bytes=4096)


def _run(address: str, server, prepare=lambda worker: None) -> tuple[str, Worker]:
    worker = Worker(address, quiet=True, give_up_after_s=60)
    prepare(worker)
    thread, out = run_in_thread(worker.run)
    thread.join(timeout=TIMEOUT_S)
    assert out.get("result") == 0, out
    return master_hash(server.coordinator), worker


@pytest.mark.server
@pytest.mark.parametrize("server_keeps_chunks", [True, False])
def test_a_push_cut_mid_stream_resumes_after_the_chunks_the_server_holds(server_keeps_chunks):
    job = digits_job(**JOB)
    with running_server(job, heads_per_worker=2, lease_timeout_s=600) as server:
        whole_master, whole = _run(server.address, server)
    push_bytes = whole.bytes_up // whole.pushes
    assert whole.pushes == job.rounds and push_bytes > 16 * 4096, (whole.pushes, push_bytes)

    with running_server(job, heads_per_worker=2, lease_timeout_s=600) as server:
        service = server.service
        assert service is not None
        partials = service.partial_pushes
        proxy = CuttingProxy(
            server.address,
            cut_after=push_bytes // 2,
            # the server has read what came before the cut (in whole chunks): what it holds
            read_enough=lambda: any(nbytes >= 0.4 * push_bytes for *_, nbytes in partials.held()),
            on_cut=(lambda: None) if server_keeps_chunks else partials.clear,
            direction="up",
        )

        def arm_at_the_second_push(worker: Worker) -> None:  # counted from its first byte
            real = worker.pusher._messages

            def messages(header, *args):
                if header.base_version == 1:
                    proxy.arm()
                return real(header, *args)

            worker.pusher._messages = messages

        try:
            cut_master, worker = _run(proxy.address, server, arm_at_the_second_push)
        finally:
            proxy.close()
        assert proxy.cut.is_set() and proxy.connections >= 2

    assert cut_master == whole_master  # the resumed push is the same push: the same model, bit for bit
    assert worker.pushes == job.rounds
    resent = worker.bytes_up - whole.bytes_up  # what the cut cost on the uplink
    print(f"\npush {push_bytes} B cut after {push_bytes // 2} B: {resent} B sent again")
    if server_keeps_chunks:
        assert worker.pusher.resumed == 1 and partials.resumed == 1
        # sent again: only what was in flight at the cut, not the 40 % and more the server held
        assert resent < 0.75 * push_bytes, (resent, push_bytes)
    else:
        assert worker.pusher.resumed == 0 and partials.resumed == 0
        assert resent >= push_bytes // 2, (resent, push_bytes)  # everything before the cut went again
    assert partials.held() == []  # nothing left behind once the push was applied


def _header(lease: str = "L", push_id: int = 7, resume_from: int = 0, steps: int = 10) -> pb.PushHeader:
    return pb.PushHeader(
        lease_id=lease, base_version=0, steps=steps, push_id=push_id, resume_from=resume_from
    )


def _chunk(n: int) -> pb.UpdateChunk:
    return pb.UpdateChunk(tensor=pb.TensorChunk(data=bytes(n)))


def test_a_resume_takes_only_the_chunks_of_the_same_push_and_a_broken_stream_keeps_them():
    clock = [0.0]
    partials = PartialPushes(keep_s=100, max_kept_bytes=1000, clock=lambda: clock[0])
    partial, reader, held = partials.open(_header())
    assert held == 0
    stream = partials.read(partial, reader, held, iter([_chunk(10), _chunk(20), _chunk(30)]))
    assert len(list(stream)) == 3 and partials.offset("L", 7) == (3, 60)
    partials.close(partial, reader, keep=True)  # its stream broke
    assert partials.offset("L", 7) == (3, 60) and partials.offset("L", 8) == (0, 0)

    # another header (other steps) or more chunks than held: refused, the push goes again whole
    for header in (
        _header(resume_from=2, steps=11),
        _header(resume_from=4),
        _header(push_id=8, resume_from=1),
    ):
        with pytest.raises(Refused) as refused:
            partials.open(header)
        assert refused.value.reason is Refusal.RESUME_LOST
    assert push_identity(_header(resume_from=2)) == push_identity(_header())

    # a resume after 2: the third chunk (in flight at the cut) comes again from the new stream
    partial2, reader2, held2 = partials.open(_header(resume_from=2))
    assert held2 == 2 and partials.resumed == 1
    # the stream that broke unnoticed reads on: it stops, and does not touch the retry's chunks
    with pytest.raises(Exception) as superseded:
        list(partials.read(partial, reader, 0, iter([_chunk(99)])))
    assert type(superseded.value).__name__ == "Superseded"
    out = list(partials.read(partial2, reader2, held2, iter([_chunk(30)])))
    assert [len(m.tensor.data) for m in out] == [10, 20, 30]
    partials.close(partial, reader, keep=True)  # the old stream's end changes nothing
    partials.close(partial2, reader2, keep=False)  # read to its end: dropped
    assert partials.held() == []


def test_kept_pushes_are_dropped_after_keep_s_and_beyond_max_kept_bytes_oldest_first():
    clock = [0.0]
    partials = PartialPushes(keep_s=100, max_kept_bytes=130, clock=lambda: clock[0])  # 2 of the 3 below
    for i, lease in enumerate(("a", "b", "c")):
        clock[0] = float(i)
        partial, reader, held = partials.open(_header(lease=lease))
        list(partials.read(partial, reader, held, iter([_chunk(40)])))
        partials.close(partial, reader, keep=True)
    assert sorted(lease for lease, *_ in partials.held()) == ["b", "c"]  # 3 x 58 B > 130: the oldest went
    clock[0] = 101.5
    assert partials.offset("b", 7) == (0, 0) and partials.offset("c", 7) == (1, 40)  # b kept since 1 s
    # a new push of a lease replaces the lease's kept one
    partial, reader, held = partials.open(_header(lease="c", push_id=9))
    assert partials.offset("c", 7) == (0, 0) and partials.offset("c", 9) == (0, 0)


class _Dropped(grpc.RpcError):
    """What a push whose link dropped raises on the worker."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "the test dropped the link"

    def trailing_metadata(self):
        return ()


@pytest.mark.server
def test_a_resume_the_server_cannot_honour_is_refused_and_the_worker_sends_the_push_whole():
    job = digits_job(heads=1, steps=10, merge_every=10)  # one round, closed by one push
    with running_server(job, lease_timeout_s=600) as server:
        tries: list[int] = []

        def prepare(worker: Worker) -> None:
            real = worker.pusher._stream
            # the server holds nothing of the push (its first try never reached it), yet the worker
            # is told 2 chunks: a server that dropped them between PushOffset and the retry
            worker.pusher._held = lambda *args: (2, 8192)

            def stream(meta, encoded, max_chunk_bytes, push_id, skip, *rest):
                tries.append(skip)
                if len(tries) == 1:
                    raise _Dropped()
                return real(meta, encoded, max_chunk_bytes, push_id, skip, *rest)

            worker.pusher._stream = stream

        _, worker = _run(server.address, server, prepare)
        assert server.coordinator.version == 1 and worker.pushes == 1
    assert tries == [0, 2, 0]  # dropped; the resume refused (RESUME_LOST); then whole, and applied


@pytest.mark.server
def test_a_push_header_with_a_negative_push_id_or_resume_from_is_malformed():
    with (
        running_server(digits_job(heads=1), lease_timeout_s=600) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.ParameterServerStub(channel)
        reply = stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(name="t")), timeout=10)
        for fields in ({"push_id": -1}, {"push_id": 5, "resume_from": -2}, {"resume_from": 3}):
            header = pb.PushHeader(lease_id=reply.lease_id, base_version=0, **fields)
            with pytest.raises(grpc.RpcError) as err:
                stub.PushUpdate(iter([pb.UpdateChunk(header=header)]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.PushOffset(pb.PushOffsetRequest(lease_id=reply.lease_id, push_id=0), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        offset = stub.PushOffset(pb.PushOffsetRequest(lease_id=reply.lease_id, push_id=5), timeout=10)
        assert (offset.chunks_received, offset.bytes_received) == (0, 0)


def test_kept_chunks_are_counted_as_stored_and_an_empty_chunk_inside_a_tensor_is_refused():
    partials = PartialPushes()
    partial, reader, held = partials.open(_header())
    list(partials.read(partial, reader, held, (_chunk(1) for _ in range(1000))))
    partials.close(partial, reader, keep=True)
    assert partials.offset("L", 7) == (1000, 1000)  # payload bytes
    assert partials.kept_bytes() >= 1000 * (1 + CHUNK_OVERHEAD)  # what they hold, not what they carry
    # an empty chunk after a tensor's first counts nothing against the byte limits: refused
    assembler = TensorAssembler(max_chunk_bytes=64, max_tensor_bytes=64, max_total_bytes=64, max_tensors=1)
    header = pb.TensorHeader(
        name="t", dtype="float32", shape=[4], codec="fp32", raw_nbytes=16, payload_nbytes=16
    )
    assert assembler.add(pb.TensorChunk(header=header, data=bytes(8))) is None
    with pytest.raises(WireError, match="empty chunk inside tensor 't'"):
        assembler.add(pb.TensorChunk(data=b""))


@pytest.mark.server
def test_a_push_the_worker_cancels_half_way_is_kept_every_time():
    """gRPC can end a cancelled request stream as if the client had closed it (StopIteration, not an
    error): the push then reads as one that ended early, and its chunks must still be kept. Before
    the fix 5 of 20 such cancels lost them (review of 2026-12-07)."""
    job = digits_job(heads=1, steps=1000, mode="async", uplink="fp32", max_chunk_bytes=4096)
    with (
        running_server(job, heads_per_worker=1, lease_timeout_s=600, guard=SYNTHETIC) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        assert server.service is not None
        partials = server.service.partial_pushes
        stub = pb_grpc.ParameterServerStub(channel)
        reply = stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(name="t", max_heads=1)), timeout=30)
        head = reply.heads[0].head_id
        factors = random_factors(server.coordinator, [head])
        messages = push_messages(reply.lease_id, {head: 0}, 0, factors, codec="fp32", max_chunk_bytes=4096)
        assert len(messages) > 8
        for push_id in range(1, 11):
            held = _cancel_half_way(stub, partials, reply.lease_id, messages, push_id)
            assert held == len(messages) // 2 - 1, push_id


def _cancel_half_way(stub, partials: PartialPushes, lease_id: str, messages, push_id: int) -> int:
    """Send the header and the first half of the chunks, go idle, cancel; the chunks then held."""
    messages[0].header.push_id = push_id
    half = len(messages) // 2
    gate = threading.Event()

    def stream():
        yield from messages[:half]
        gate.wait(60)  # idle, the way a sender behind a dead link is

    call = stub.PushUpdate.future(stream(), timeout=60)
    wait_until(lambda: partials.offset(lease_id, push_id)[0] == half - 1, 30, "the first half")
    call.cancel()
    gate.set()
    wait_until(lambda: partials.kept_bytes() > 0, 30, "the push to be kept")
    return partials.offset(lease_id, push_id)[0]
