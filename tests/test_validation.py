"""Every malformed request is refused with a precise gRPC status and a message that names the fault,
and the master weights stay bit-identical (SHA-256 over ``plain_state()``) (issue 5, item 4).

The pushes are built with the worker's own encoding path (``encode_tensor`` + ``tensor_chunks``),
then one thing at a time is corrupted and sent with the generated stub to a real server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch

from lte.common.wire.chunks import tensor_chunks
from lte.common.wire.codec import encode_tensor
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server.grpc_server import ParameterServer
from tests.cluster import digits_job, running_server
from tests.faults import SYNTHETIC, FakeClock, master_hash, push_messages, random_factors

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
MAX_STALENESS = 3


@pytest.fixture(scope="module")
def server() -> Iterator[ParameterServer]:
    # async: every accepted push is folded into W at once, so a wrongly accepted one would show in the hash
    job = digits_job(heads=4, mode="async", steps=10_000)
    with running_server(
        job, heads_per_worker=2, max_staleness=MAX_STALENESS, lease_timeout_s=600, guard=SYNTHETIC
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.ParameterServerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ParameterServerStub(channel)


@dataclasses.dataclass
class Lease:
    """A registered lease and what a correct push on it must carry."""

    reply: pb.RegisterReply
    server: ParameterServer

    @property
    def lease_id(self) -> str:
        return self.reply.lease_id

    @property
    def heads(self) -> list[int]:
        return [h.head_id for h in self.reply.heads]

    def rounds(self) -> dict[int, int]:
        c = self.server.coordinator
        return {h: c.heads[h].next_round for h in self.heads}

    def tensors(self, seed: int = 0) -> dict[str, torch.Tensor]:
        return random_factors(self.server.coordinator, self.heads, seed)

    def push(self, **overrides) -> list[pb.UpdateChunk]:
        """A correct push of this lease's next round on the server's newest version."""
        args = dict(
            lease_id=self.lease_id,
            head_rounds=self.rounds(),
            base_version=self.server.coordinator.version,
            tensors=self.tensors(),
        )
        args.update(overrides)
        return push_messages(**args)


@contextlib.contextmanager
def registered(stub, server, max_heads: int = 2) -> Iterator[Lease]:
    reply = stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(name="v", max_heads=max_heads)), timeout=10)
    try:
        yield Lease(reply, server)
    finally:
        stub.Leave(pb.LeaveRequest(lease_id=reply.lease_id, reason="test over"), timeout=10)


@pytest.fixture
def lease(stub, server) -> Iterator[Lease]:
    with registered(stub, server) as held:
        yield held


@contextlib.contextmanager
def weights_unchanged(server: ParameterServer) -> Iterator[None]:
    c = server.coordinator
    before, version, rounds = master_hash(c), c.version, c.head_rounds_applied
    yield
    assert master_hash(c) == before, "the master weights changed"
    assert (c.version, c.head_rounds_applied) == (version, rounds)


def refused(call: Callable[[], object], code: grpc.StatusCode, pattern: str) -> str:
    """Run one RPC; it must fail with ``code`` and a message matching ``pattern``."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"{err.code()} {err.details()!r}"
    assert re.search(pattern, err.details()), err.details()
    return err.details()


# -- mutations of a correct push, one fault each ---------------------------------------------------
def _tensor_index(msgs: list[pb.UpdateChunk], suffix: str) -> int:
    return next(i for i, m in enumerate(msgs) if m.tensor.header.name.endswith(suffix))


def _retensor(
    lease: Lease, suffix: str, fn: Callable[[str, torch.Tensor], object], **push_kw
) -> list[pb.UpdateChunk]:
    """Replace the tensor whose name ends with ``suffix`` by ``fn(name, tensor)``: an EncodedTensor,
    or a tensor to encode like the others (fp16 + zstd)."""
    tensors = lease.tensors()
    name = next(n for n in tensors if n.endswith(suffix))
    msgs = lease.push(tensors={n: t for n, t in tensors.items() if n != name}, **push_kw)
    made = fn(name, tensors[name])
    enc = made if not isinstance(made, torch.Tensor) else encode_tensor(name, made, "fp16", 3)
    return msgs + [pb.UpdateChunk(tensor=c) for c in tensor_chunks(enc, 1 << 20)]


def _renamed(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    msgs[
        _tensor_index(msgs, "hidden.0.weight/B")
    ].tensor.header.name = f"head/{lease.heads[0]}/hidden.9.weight/B"
    return msgs


def _wrong_shape(lease: Lease) -> list[pb.UpdateChunk]:
    return _retensor(lease, "hidden.0.weight/A", lambda n, t: t.t().contiguous())  # (64, 16), not (16, 64)


def _unknown_codec(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    msgs[_tensor_index(msgs, "head.weight/A")].tensor.header.codec = "fp12"
    return msgs


def _snapshot_codec(lease: Lease) -> list[pb.UpdateChunk]:  # a real codec, but not an uplink one
    return _retensor(lease, "head.weight/B", lambda n, t: encode_tensor(n, t, "nf4", 3))


def _nan(lease: Lease) -> list[pb.UpdateChunk]:
    def poison(name, t):
        t = t.clone()
        t[0, 0] = math.nan
        return encode_tensor(name, t, "fp32", 3)

    return _retensor(lease, "hidden.1.weight/A", poison)


def _inf(lease: Lease) -> list[pb.UpdateChunk]:  # 1e6 overflows fp16 to inf on the worker's own path
    return _retensor(lease, "hidden.1.weight/B", lambda n, t: t + 1e6)


def _inf_replica(lease: Lease) -> list[pb.UpdateChunk]:
    return _retensor(lease, "replica/head.bias", lambda n, t: torch.full_like(t, -math.inf))


def _zstd_garbage(lease: Lease) -> list[pb.UpdateChunk]:
    return _retensor(
        lease,
        "head.weight/B",
        lambda n, t: dataclasses.replace(
            encode_tensor(n, t, "fp16", 3), payload=bytes(range(256)) * 2, compressed=True
        ),
    )


def _truncated_zstd(lease: Lease) -> list[pb.UpdateChunk]:
    def cut(name, t):
        enc = encode_tensor(name, t, "fp16", 3)
        return dataclasses.replace(enc, payload=enc.payload[: len(enc.payload) // 2])

    return _retensor(lease, "hidden.1.weight/A", cut)


def _short_raw_payload(lease: Lease) -> list[pb.UpdateChunk]:
    def cut(name, t):
        enc = encode_tensor(name, t, "fp16", None)
        return dataclasses.replace(enc, payload=enc.payload[:-2])

    return _retensor(lease, "hidden.0.weight/B", cut)


def _lying_raw_nbytes(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    msgs[_tensor_index(msgs, "hidden.0.weight/B")].tensor.header.raw_nbytes += 2
    return msgs


def _unknown_dtype(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    msgs[_tensor_index(msgs, "head.weight/A")].tensor.header.dtype = "int64"
    return msgs


def _missing(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    del msgs[_tensor_index(msgs, "replica/hidden.1.bias")]
    return msgs


def _duplicate(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    return msgs + [msgs[_tensor_index(msgs, "hidden.0.weight/A")]]


def _other_heads_tensor(lease: Lease) -> list[pb.UpdateChunk]:  # a push of head h carrying head h+2's factors
    msgs = lease.push(head_rounds={lease.heads[0]: lease.rounds()[lease.heads[0]]})
    i = _tensor_index(msgs, "hidden.0.weight/B")
    msgs[i].tensor.header.name = f"head/{lease.heads[1]}/hidden.0.weight/B"
    return msgs


def _small_chunks(lease: Lease) -> list[pb.UpdateChunk]:
    return lease.push(max_chunk_bytes=4096, zstd_level=None)  # hidden.1.weight/A: 8 KiB in two chunks


def _truncated_stream(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = _small_chunks(lease)
    return msgs[: _tensor_index(msgs, "hidden.1.weight/A") + 1]  # the connection ends after its first chunk


def _chunk_lost_midway(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = _small_chunks(lease)
    first = _tensor_index(msgs, "hidden.1.weight/A")
    assert not msgs[first + 1].tensor.HasField("header")
    return msgs[: first + 1] + msgs[first + 2 :]


def _over_declared(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    msgs[_tensor_index(msgs, "hidden.1.weight/B")].tensor.header.payload_nbytes -= 3
    return msgs


def _trailing_chunk(lease: Lease) -> list[pb.UpdateChunk]:
    return lease.push() + [pb.UpdateChunk(tensor=pb.TensorChunk(data=b"\x00" * 16))]


def _declares_huge(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    msgs[_tensor_index(msgs, "hidden.0.weight/A")].tensor.header.payload_nbytes = 1 << 40
    return msgs


def _chunk_over_limit(lease: Lease) -> list[pb.UpdateChunk]:
    header = pb.TensorHeader(
        name=f"head/{lease.heads[0]}/hidden.0.weight/B", dtype="float32", shape=[256, 16], codec="fp32"
    )
    header.raw_nbytes = header.payload_nbytes = 16384
    big = pb.TensorChunk(header=header, data=b"\x00" * ((1 << 20) + 1))
    return lease.push()[:1] + [pb.UpdateChunk(tensor=big)]


def _tensor_first(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    return msgs[1:] + msgs[:1]


def _empty_stream(lease: Lease) -> list[pb.UpdateChunk]:
    return []


def _two_headers(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    return msgs[:3] + msgs[:1] + msgs[3:]


def _empty_message(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    return msgs[:2] + [pb.UpdateChunk()] + msgs[2:]


def _headerless_chunk_first(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    return msgs[:1] + [pb.UpdateChunk(tensor=pb.TensorChunk(data=b"\x01\x02"))] + msgs[1:]


def _with_header(**fields) -> Callable[[Lease], list[pb.UpdateChunk]]:
    def make(lease: Lease) -> list[pb.UpdateChunk]:
        msgs = lease.push()
        for key, value in fields.items():
            setattr(msgs[0].header, key, value)
        return msgs

    return make


def _rounds(fn: Callable[[Lease, dict[int, int]], dict[int, int]]) -> Callable[[Lease], list[pb.UpdateChunk]]:
    return lambda lease: lease.push(head_rounds=fn(lease, lease.rounds()))


def _head_twice(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    msgs[0].header.heads.append(msgs[0].header.heads[0])
    return msgs


def _no_heads(lease: Lease) -> list[pb.UpdateChunk]:
    msgs = lease.push()
    del msgs[0].header.heads[:]
    return msgs


def _future_version(lease: Lease) -> list[pb.UpdateChunk]:
    return lease.push(base_version=lease.server.coordinator.version + 1)


# (case, push, status, what the message must say)
CASES = [
    ("wrong tensor name", _renamed, INVALID, r"unexpected tensor 'head/\d+/hidden\.9\.weight/B'"),
    ("wrong shape", _wrong_shape, INVALID, r"hidden\.0\.weight/A' has shape \(64, 16\), the job expects \(16, 64\)"),
    ("unknown codec", _unknown_codec, INVALID, r"unknown codec 'fp12'"),
    ("snapshot codec on the uplink", _snapshot_codec, INVALID, r"uses codec 'nf4'; uplink codecs"),
    ("NaN in a factor", _nan, INVALID, r"hidden\.1\.weight/A' holds NaN or Inf"),
    ("Inf in a factor (fp16 overflow)", _inf, INVALID, r"hidden\.1\.weight/B' holds NaN or Inf"),
    ("Inf in a replica delta", _inf_replica, INVALID, r"replica/head\.bias' holds NaN or Inf"),
    ("zstd garbage", _zstd_garbage, INVALID, r"not a zstd frame|zstd frame is corrupt"),
    ("truncated zstd frame", _truncated_zstd, INVALID, r"zstd frame is corrupt, truncated"),
    ("raw payload too short", _short_raw_payload, INVALID, r"payload of shape \(256, 16\) must be 8192 bytes, got 8190"),
    ("raw_nbytes lies", _lying_raw_nbytes, INVALID, r"raw_nbytes says 8194"),
    ("unknown dtype", _unknown_dtype, INVALID, r"unknown dtype 'int64'"),
    ("missing tensor", _missing, INVALID, r"push is missing tensors \['replica/hidden\.1\.bias'\]"),
    ("duplicate tensor", _duplicate, INVALID, r"hidden\.0\.weight/A' sent twice"),
    ("factors of a head not in the push", _other_heads_tensor, INVALID, r"unexpected tensor 'head/\d+/hidden\.0\.weight/B'"),
    ("stream truncated inside a tensor", _truncated_stream, INVALID, r"stream ended inside tensor 'head/\d+/hidden\.1\.weight/A' \(4096 of 8192 bytes\)"),
    ("a chunk lost mid-tensor", _chunk_lost_midway, INVALID, r"hidden\.1\.weight/A' is incomplete \(4096 of 8192 bytes\)"),
    ("payload over its declared size", _over_declared, INVALID, r"hidden\.1\.weight/B' sent more than its declared"),
    ("a chunk after the last tensor", _trailing_chunk, INVALID, r"tensor chunk without a header arrived outside any tensor"),
    ("declared size over the limit", _declares_huge, INVALID, r"declares 1099511627776 bytes; the limit is"),
    ("chunk over the chunk limit", _chunk_over_limit, INVALID, r"chunk of 1048577 bytes exceeds the 1048576-byte chunk limit"),
    ("tensor chunk before the header", _tensor_first, INVALID, r"a push must start with its PushHeader"),
    ("no header at all", _empty_stream, INVALID, r"a push must start with its PushHeader"),
    ("a second header mid-stream", _two_headers, INVALID, r"only tensor chunks may follow the PushHeader"),
    ("an empty message mid-stream", _empty_message, INVALID, r"only tensor chunks may follow the PushHeader"),
    ("data chunk with no tensor header", _headerless_chunk_first, INVALID, r"tensor chunk without a header"),
    ("unknown lease", _with_header(lease_id="f" * 32), grpc.StatusCode.NOT_FOUND, r"unknown lease 'ffffffffffff': register again"),
    ("empty lease id", _with_header(lease_id=""), grpc.StatusCode.NOT_FOUND, r"unknown lease ''"),
    ("a head id the job does not have", _rounds(lambda l, r: {99: 0}), INVALID, r"heads \[99\] do not exist: this job has heads 0\.\.\d+"),
    ("negative round", _rounds(lambda l, r: {h: -1 for h in r}), INVALID, r"head \d+ has negative round -1"),
    ("round id from the future", _rounds(lambda l, r: {h: n + 1 for h, n in r.items()}), PRECONDITION, r"round ids out of step \(head: sent, expected\): \d+: \d+, \d+"),
    ("one head's round from the future", _rounds(lambda l, r: {h: n + (h == l.heads[1]) for h, n in r.items()}), PRECONDITION, r"round ids out of step"),
    ("a head named twice", _head_twice, INVALID, r"head \d+ named twice in one push"),
    ("no heads", _no_heads, INVALID, r"push names no heads"),
    ("base_version beyond the server's", _future_version, grpc.StatusCode.OUT_OF_RANGE, r"base_version \d+ is outside \[0, \d+\] \(the server's newest\)"),
    ("negative base_version", _with_header(base_version=-1), grpc.StatusCode.OUT_OF_RANGE, r"base_version -1 is outside"),
    ("tensor count off by one", _with_header(num_tensors=1), INVALID, r"push header announces 1 tensors; 2 head\(s\) of this job need \d+ \(B and A per layer"),
    ("NaN train_loss", _with_header(train_loss=math.nan), INVALID, r"train_loss is nan"),
    ("Inf seconds", _with_header(seconds=math.inf), INVALID, r"seconds is inf"),
    ("negative samples", _with_header(samples=-5), INVALID, r"steps and samples must be >= 0"),
]  # fmt: skip


@pytest.mark.server
@pytest.mark.parametrize(("make", "code", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_malformed_push_is_refused_precisely_and_changes_nothing(server, stub, lease, make, code, pattern):
    msgs = make(lease)
    rounds = lease.rounds()
    with weights_unchanged(server):
        refused(lambda: stub.PushUpdate(iter(msgs), timeout=30), code, pattern)
    assert lease.rounds() == rounds, "a refused push advanced a round id"
    # and the lease is still good: the correct push goes through afterwards
    reply = stub.PushUpdate(iter(lease.push()), timeout=30)
    assert reply.applied and not reply.duplicate


@pytest.mark.server
def test_a_message_over_the_grpc_limit_is_refused_by_grpc_itself(server, stub, lease):
    too_big = pb.UpdateChunk(tensor=pb.TensorChunk(data=b"\x00" * (2 << 20)))
    with weights_unchanged(server):
        refused(
            lambda: stub.PushUpdate(iter(lease.push()[:1] + [too_big]), timeout=30),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            r"larger than max",
        )


@pytest.mark.server
def test_a_correct_push_is_applied_and_its_replay_is_acknowledged_without_effect(server, stub, lease):
    c = server.coordinator
    msgs = lease.push()
    before, version = master_hash(c), c.version
    reply = stub.PushUpdate(iter(msgs), timeout=30)
    assert reply.applied and not reply.duplicate and reply.version == version + 1
    assert master_hash(c) != before, "the hash must see an applied push, or the refusal tests prove nothing"
    with weights_unchanged(server):
        for _ in range(2):  # a retry after a lost reply, and another
            replay = stub.PushUpdate(iter(msgs), timeout=30)
            assert replay.duplicate and not replay.applied
            assert replay.version == version + 1


@pytest.mark.server
def test_a_push_on_a_head_leased_to_another_worker_is_refused(server, stub, lease):
    with registered(stub, server) as other:
        theirs = lease.push(head_rounds=other.rounds())  # this lease, the other lease's heads
        with weights_unchanged(server):
            refused(
                lambda: stub.PushUpdate(iter(theirs), timeout=30),
                grpc.StatusCode.PERMISSION_DENIED,
                rf"heads \[{other.heads[0]}, {other.heads[1]}\] are not leased to this worker",
            )


@pytest.mark.server
def test_a_push_staler_than_the_bound_is_refused_in_async_mode(server, stub, lease):
    base = server.coordinator.version
    for seed in range(MAX_STALENESS + 1):  # move W on by MAX_STALENESS + 1 versions
        assert stub.PushUpdate(iter(lease.push(tensors=lease.tensors(seed))), timeout=30).applied
    stale = lease.push(base_version=base)
    refused_before = server.coordinator.pushes_refused
    with weights_unchanged(server):
        refused(
            lambda: stub.PushUpdate(iter(stale), timeout=30),
            PRECONDITION,
            rf"trained on version {base} is {MAX_STALENESS + 1} versions stale \(limit {MAX_STALENESS}\)",
        )
    assert server.coordinator.pushes_refused == refused_before + 1


@pytest.mark.server
def test_a_push_after_leave_is_refused(server, stub):
    with registered(stub, server) as gone:
        msgs = gone.push()
    with weights_unchanged(server):
        refused(
            lambda: stub.PushUpdate(iter(msgs), timeout=30), PRECONDITION, r"was given back: register again"
        )


@pytest.mark.server
def test_sync_mode_refuses_a_push_trained_on_an_older_version():
    job = digits_job(heads=2, mode="sync", steps=1000)
    with (
        running_server(job, heads_per_worker=2, guard=SYNTHETIC) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.ParameterServerStub(ch)
        with registered(stub, server) as lease:
            assert stub.PushUpdate(iter(lease.push()), timeout=30).applied  # both heads: the round closes
            assert server.coordinator.version == 1
            stale = lease.push(base_version=0)
            with weights_unchanged(server):
                refused(
                    lambda: stub.PushUpdate(iter(stale), timeout=30),
                    PRECONDITION,
                    r"sync round 1 is open; this push trained on version 0: pull and retrain",
                )
            assert stub.PushUpdate(iter(lease.push()), timeout=30).applied


@pytest.mark.server
def test_other_rpcs_validate_their_fields(server, stub, lease):
    cases = [
        (
            lambda: stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(max_heads=-1)), timeout=10),
            INVALID,
            r"max_heads must be in \[0, 4096\], got -1",
        ),
        (
            lambda: stub.Heartbeat(
                pb.HeartbeatRequest(lease_id=lease.lease_id, samples_per_s=math.nan), timeout=10
            ),
            INVALID,
            r"samples_per_s must be finite and >= 0, got nan",
        ),
        (
            lambda: stub.Heartbeat(pb.HeartbeatRequest(lease_id="nope"), timeout=10),
            grpc.StatusCode.NOT_FOUND,
            r"unknown lease 'nope'",
        ),
        (
            lambda: list(
                stub.PullModel(pb.PullRequest(lease_id=lease.lease_id, have_version=-2), timeout=10)
            ),
            INVALID,
            r"have_version must be >= -1, got -2",
        ),
        (
            lambda: list(
                stub.PullModel(
                    pb.PullRequest(lease_id=lease.lease_id, have_version=-1, resume_stream=7, resume_from=-1),
                    timeout=10,
                )
            ),
            INVALID,
            r"resume_from must be >= 0, got -1",
        ),
        (
            lambda: list(
                stub.PullModel(
                    pb.PullRequest(lease_id=lease.lease_id, have_version=-1, wait_newer_s=math.inf),
                    timeout=10,
                )
            ),
            INVALID,
            r"wait_newer_s must be finite and >= 0, got inf",
        ),
        (
            lambda: list(stub.PullModel(pb.PullRequest(lease_id="nope", have_version=-1), timeout=10)),
            grpc.StatusCode.NOT_FOUND,
            r"unknown lease 'nope'",
        ),
    ]
    foreign = next(h for h in range(server.coordinator.job.heads) if h not in lease.heads)
    cases.append(
        (
            lambda: list(
                stub.PullModel(
                    pb.PullRequest(lease_id=lease.lease_id, have_version=-1, head_factors=[foreign]),
                    timeout=10,
                )
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            rf"head {foreign} is not leased to this worker",
        )
    )
    cases.append(
        (
            lambda: list(
                stub.PullModel(
                    pb.PullRequest(lease_id=lease.lease_id, have_version=-1, head_factors=[-3]),
                    timeout=10,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"heads \[-3\] do not exist: this job has heads 0\.\.\d+",
        )
    )
    with weights_unchanged(server):
        for call, code, pattern in cases:
            refused(call, code, pattern)
        stub.Leave(pb.LeaveRequest(lease_id="never-registered"), timeout=10)  # idempotent: OK, no effect


@pytest.mark.server
@pytest.mark.parametrize("state", ["left", "expired", "registered", "x" * 40])
def test_a_heartbeat_cannot_move_its_lease_into_a_server_state(state):
    # regression: a heartbeat saying "left" once froze the lease, so its heads never returned
    clock = FakeClock()  # no expiry while we talk; then the test moves the time past the lease
    with (
        running_server(digits_job(heads=2), lease_timeout_s=60.0, clock=clock, guard=SYNTHETIC) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub, c = pb_grpc.ParameterServerStub(channel), server.coordinator
        lease = stub.Register(pb.RegisterRequest(), timeout=10).lease_id
        stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease, state="training"), timeout=10)
        assert c.leases[lease].state == "training"
        stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease, state=state), timeout=10)
        assert c.leases[lease].state == "training"
        # silent now: its timeout passes on the fake clock and the scheduler's sweep expires it, so a
        # stall of the shared machine between the calls above cannot expire it early
        clock.advance(61.0)
        c.run_scheduler()
        assert c.leases[lease].state == "expired"
        assert sorted(c.status()["free_heads"]) == [0, 1]


def test_all_finite_is_exact_where_the_fast_sum_overflows():
    from lte.server.coordinator import all_finite

    big = torch.full((1000,), 3e38)  # every value finite, the float32 sum is not
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(64, 48)
        t[17, 5] = bad
        assert not all_finite(t)
        big[999] = bad
        assert not all_finite(big)
        big[999] = 3e38
    pair = torch.tensor([float("inf"), -float("inf")])  # a sum of NaN, not a cancellation
    assert not all_finite(pair) and all_finite(torch.zeros(0))


@pytest.mark.server
def test_a_worker_that_does_not_apply_the_jobs_head_data_is_refused_at_register():
    """An older worker drops the unknown JobConfig.head_data and would train on shards: the version
    handshake refuses it by name unless its WorkerInfo lists the field (a shard job still takes it)."""
    from lte.common.job.config import JobConfig
    from lte.common.wire.protocol import PROTOCOL_VERSION, REFUSAL_KEY, Refusal

    with (
        running_server(digits_job(heads=2, head_data="iid"), lease_timeout_s=600) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(lte_version="0.9")), timeout=10)
        assert err.value.code() == PRECONDITION
        assert re.search(
            r"lte-worker 0\.9, wire protocol 1 does not know the job field\(s\) .*head_data",
            err.value.details(),
        )
        assert (REFUSAL_KEY, Refusal.INCOMPATIBLE.value) in tuple(err.value.trailing_metadata())
        assert server.coordinator.leases == {}  # refused before touching state
        fields = [f.name for f in dataclasses.fields(JobConfig)]
        info = pb.WorkerInfo(protocol_version=PROTOCOL_VERSION, job_fields=fields)
        reply = stub.Register(pb.RegisterRequest(worker=info), timeout=10)
        assert reply.job.head_data == "iid" and len(reply.heads) == 2
    with (
        running_server(digits_job(heads=2, head_data="shard"), lease_timeout_s=600) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        reply = pb_grpc.ParameterServerStub(channel).Register(pb.RegisterRequest(), timeout=10)
        assert reply.job.head_data == "shard" and len(reply.heads) == 2
