"""Fuzz every RPC of one real server (issue 5, item 6): hypothesis-generated protobuf messages,
mutations of correct pushes, and random bytes through a generic channel. The server must answer
every request with a deliberate status (never UNKNOWN, the mark of an unhandled exception), stay
up, keep serving health and a normal Register, and the master weights must stay bit-identical.

Examples are derandomized so CI is reproducible; ``LTE_FUZZ_REPORT=path`` writes the tally as JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from tests.cluster import digits_job, running_server
from tests.faults import SYNTHETIC, master_hash, push_messages, random_factors

SERVICE = "/lte.v1.ParameterServer/"
# statuses the service gives on purpose; INTERNAL only as gRPC's own "Exception deserializing request!"
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,  # a resume the server cannot honour (RESUME_LOST)
}
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
TALLY: Counter = Counter()  # (rpc, status) -> requests
RAN: set[str] = set()

pytestmark = pytest.mark.server  # tier: see tests/conftest.py


class Target:
    """The server under fuzz, a channel to it, and live leases whose ids the fuzz may use."""

    def __init__(self, server, channel: grpc.Channel) -> None:
        self.server, self.channel = server, channel
        self.c = server.coordinator
        self.stub = pb_grpc.ParameterServerStub(channel)

        def register() -> pb.RegisterReply:
            return self.stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(max_heads=1)), timeout=10)

        self.leases = [register().lease_id for _ in range(2)]  # the fuzz may heartbeat or pull on these
        self.pusher = register()  # the mutation fuzz pushes on this one; nothing else names it
        self.hash = master_hash(self.c)
        self.version = self.c.version


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    job = digits_job(heads=4, mode="async", steps=10_000)
    with (
        running_server(job, heads_per_worker=1, lease_timeout_s=3600, guard=SYNTHETIC) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        yield Target(server, channel)


def call(rpc: str, fn) -> grpc.StatusCode:
    """Make one request; tally and return its status. An unexpected status fails at once."""
    try:
        fn()
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        internal_ok = code == grpc.StatusCode.INTERNAL and err.details() == "Exception deserializing request!"
        assert code in DELIBERATE or internal_ok, f"{rpc}: {code} {err.details()!r}"
    TALLY[(rpc, code.name)] += 1
    return code


# -- strategies -------------------------------------------------------------------------------------
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
small = st.integers(-3, 8)
text = st.text(max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True)
NAMES = [
    f"head/{h}/{layer}/{p}" for h in range(4) for layer in ("hidden.0.weight", "head.weight") for p in "BA"
]
NAMES += ["replica/hidden.0.bias", "replica/head.bias", ""]


def lease_ids(target: Target) -> st.SearchStrategy[str]:
    return st.one_of(text, st.sampled_from(target.leases))


worker_info = st.builds(
    pb.WorkerInfo,
    name=text,
    device=text,
    free_memory_bytes=int64,
    max_heads=st.one_of(small, int32),
    hostname=st.text(max_size=300),
    pid=int32,
    lte_version=text,
)
tensor_header = st.builds(
    pb.TensorHeader,
    name=st.one_of(st.sampled_from(NAMES), text),
    dtype=st.one_of(st.sampled_from(["float32", "float16", "bfloat16", "float64", "int8"]), text),
    shape=st.lists(st.one_of(small, st.integers(0, 300), int64), max_size=5),
    codec=st.one_of(st.sampled_from(["fp32", "fp16", "bf16", "int8-block", "int8-row", "nf4"]), text),
    zstd=st.booleans(),
    raw_nbytes=st.one_of(st.integers(-1, 20_000), int64),
    payload_nbytes=st.one_of(st.integers(-1, 600), int64),
)
tensor_chunk = st.builds(
    pb.TensorChunk, header=st.one_of(st.none(), tensor_header), data=st.binary(max_size=600)
)


def push_header(target: Target) -> st.SearchStrategy[pb.PushHeader]:
    return st.builds(
        pb.PushHeader,
        lease_id=lease_ids(target),
        base_version=st.one_of(small, int64),
        heads=st.lists(st.builds(pb.HeadRound, head_id=st.one_of(small, int32), round=st.one_of(small, int64)), max_size=5),
        steps=st.one_of(small, int64),
        samples=st.one_of(small, int64),
        train_loss=floats,
        num_tensors=st.one_of(small, int32),
        seconds=floats,
        push_id=st.one_of(small, int64),
        resume_from=st.one_of(small, int64),
    )  # fmt: skip


def update_chunks(target: Target) -> st.SearchStrategy[list[pb.UpdateChunk]]:
    one = st.one_of(
        st.builds(pb.UpdateChunk, header=push_header(target)),
        st.builds(pb.UpdateChunk, tensor=tensor_chunk),
        st.just(pb.UpdateChunk()),
    )
    return st.one_of(
        st.lists(one, max_size=6),
        st.tuples(st.builds(pb.UpdateChunk, header=push_header(target)), st.lists(one, max_size=6)).map(
            lambda t: [t[0], *t[1]]
        ),
    )


# -- 1. generated messages, every RPC ------------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_register(target, data):
    RAN.add("register")
    request = pb.RegisterRequest(worker=data.draw(st.one_of(st.none(), worker_info)))
    call("Register", lambda: target.stub.Register(request, timeout=10))


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_fuzz_pull(target, data):
    RAN.add("pull")
    request = pb.PullRequest(
        lease_id=data.draw(lease_ids(target)),
        have_version=data.draw(st.one_of(small, int64)),
        # a real lease long-polls up to wait_newer_s: keep finite waits short so the fuzz stays bounded
        wait_newer_s=data.draw(st.one_of(st.floats(max_value=0.05), st.sampled_from([math.nan, math.inf]))),
        head_factors=data.draw(st.lists(st.one_of(small, int32), max_size=4)),
    )
    call("PullModel", lambda: list(target.stub.PullModel(request, timeout=10)))


@settings(FUZZ, max_examples=450)
@given(data=st.data())
def test_fuzz_push(target, data):
    RAN.add("push")
    messages = data.draw(update_chunks(target))
    call("PushUpdate", lambda: target.stub.PushUpdate(iter(messages), timeout=10))


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_fuzz_heartbeat(target, data):
    RAN.add("heartbeat")
    request = pb.HeartbeatRequest(
        lease_id=data.draw(lease_ids(target)),
        version=data.draw(st.one_of(small, int64)),
        samples_per_s=data.draw(floats),
        state=data.draw(st.one_of(st.sampled_from(["training", "left", "expired", "registered"]), text)),
    )
    call("Heartbeat", lambda: target.stub.Heartbeat(request, timeout=10))


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_leave(target, data):
    RAN.add("leave")
    # the module's own leases stay: a Leave of one is correct behaviour, not a finding
    lease = data.draw(text.filter(lambda s: s not in target.leases))
    request = pb.LeaveRequest(lease_id=lease, reason=data.draw(st.text(max_size=300)))
    call("Leave", lambda: target.stub.Leave(request, timeout=10))


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_push_offset(target, data):
    RAN.add("push-offset")
    request = pb.PushOffsetRequest(
        lease_id=data.draw(lease_ids(target)), push_id=data.draw(st.one_of(small, int64))
    )
    call("PushOffset", lambda: target.stub.PushOffset(request, timeout=10))


# -- 2. correct pushes, mutated: they get past the header into decoding and validation -----------------
@pytest.fixture(scope="module")
def correct_pushes(target) -> list[list[pb.UpdateChunk]]:
    """Correct pushes of the pusher's head but for a round 1000 ahead, so no mutation can make one
    that applies: each is decoded and validated in full, then refused as out of step."""
    c, reply = target.c, target.pusher
    head = reply.heads[0].head_id
    future = {head: c.heads[head].next_round + 1000}
    factors = random_factors(c, [head])
    return [
        push_messages(reply.lease_id, future, c.version, factors, codec=codec, zstd_level=level, max_chunk_bytes=chunk)
        for codec, level, chunk in [("fp16", 3, 1 << 20), ("fp32", None, 4096), ("int8-block", 3, 1 << 20), ("bf16", None, 1 << 20)]
    ]  # fmt: skip


@st.composite
def mutated(draw, pushes: list[list[pb.UpdateChunk]]) -> list[pb.UpdateChunk]:
    msgs = [pb.UpdateChunk.FromString(m.SerializeToString()) for m in draw(st.sampled_from(pushes))]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "grow", "field", "drop", "dup", "swap", "meta"]))
        i = draw(st.integers(0, len(msgs) - 1)) if msgs else 0
        if not msgs:
            break
        m = msgs[i]
        if op == "flip" and m.tensor.data:
            data = bytearray(m.tensor.data)
            j = draw(st.integers(0, len(data) - 1))
            data[j] ^= draw(st.integers(1, 255))
            m.tensor.data = bytes(data)
        elif op == "cut":
            m.tensor.data = m.tensor.data[: draw(st.integers(0, max(0, len(m.tensor.data) - 1)))]
        elif op == "grow":
            m.tensor.data += draw(st.binary(min_size=1, max_size=64))
        elif op == "field" and m.tensor.HasField("header"):
            field = draw(
                st.sampled_from(["name", "dtype", "codec", "shape", "zstd", "raw_nbytes", "payload_nbytes"])
            )
            fresh = draw(tensor_header)
            if field == "shape":
                m.tensor.header.ClearField("shape")
                m.tensor.header.shape.extend(fresh.shape)
            else:
                setattr(m.tensor.header, field, getattr(fresh, field))
        elif op == "drop":
            del msgs[i]
        elif op == "dup":
            msgs.insert(draw(st.integers(0, len(msgs))), m)
        elif op == "swap":
            j = draw(st.integers(0, len(msgs) - 1))
            msgs[i], msgs[j] = msgs[j], msgs[i]
        elif op == "meta" and m.HasField("header"):  # everything but the round ids, which stay in the future
            field = draw(st.sampled_from(["steps", "samples", "train_loss", "seconds", "num_tensors"]))
            value = draw({"train_loss": floats, "seconds": floats, "num_tensors": int32}.get(field, int64))
            setattr(m.header, field, value)
    return msgs


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_fuzz_mutated_correct_pushes(target, correct_pushes, data):
    RAN.add("mutated")
    messages = data.draw(mutated(correct_pushes))
    code = call("PushUpdate (mutated)", lambda: target.stub.PushUpdate(iter(messages), timeout=10))
    assert code != grpc.StatusCode.OK


# -- 3. random bytes, every method of the server --------------------------------------------------------
RAW_METHODS = {
    "Register": ("unary_unary", SERVICE + "Register"),
    "PullModel": ("unary_stream", SERVICE + "PullModel"),
    "PushUpdate": ("stream_unary", SERVICE + "PushUpdate"),
    "Heartbeat": ("unary_unary", SERVICE + "Heartbeat"),
    "Leave": ("unary_unary", SERVICE + "Leave"),
    "PushOffset": ("unary_unary", SERVICE + "PushOffset"),
    "Health.Check": ("unary_unary", "/grpc.health.v1.Health/Check"),
    "ServerReflectionInfo": ("stream_stream", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
}  # fmt: skip


@settings(FUZZ, max_examples=700)
@given(name=st.sampled_from(sorted(RAW_METHODS)), data=st.data())
def test_fuzz_random_bytes(target, name, data):
    RAN.add("bytes")
    kind, method = RAW_METHODS[name]
    rpc = getattr(target.channel, kind)(method, request_serializer=None, response_deserializer=None)
    if kind.startswith("stream"):
        payloads = data.draw(st.lists(st.binary(max_size=300), max_size=4))
        request = iter(payloads)
    else:
        request = data.draw(st.binary(max_size=300))
    if kind.endswith("unary"):
        call(f"{name} (bytes)", lambda: rpc(request, timeout=10))
    else:
        call(f"{name} (bytes)", lambda: list(rpc(request, timeout=10)))


# -- after the storm ----------------------------------------------------------------------------------
def test_after_the_fuzz_the_server_serves_and_the_weights_are_untouched(target, correct_pushes):
    # whatever ran before (or was deselected), the storm happens: any fuzzer not run yet runs now
    storm = {
        "register": lambda: test_fuzz_register(target),
        "pull": lambda: test_fuzz_pull(target),
        "push": lambda: test_fuzz_push(target),
        "heartbeat": lambda: test_fuzz_heartbeat(target),
        "leave": lambda: test_fuzz_leave(target),
        "push-offset": lambda: test_fuzz_push_offset(target),
        "mutated": lambda: test_fuzz_mutated_correct_pushes(target, correct_pushes),
        "bytes": lambda: test_fuzz_random_bytes(target),
    }
    for name, fuzz in storm.items():
        if name not in RAN:
            fuzz()
    assert set(storm) == RAN
    health = health_pb2_grpc.HealthStub(target.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert master_hash(target.c) == target.hash and target.c.version == target.version
    for lease in list(target.c.leases):  # give every lease back, then a normal worker joins
        target.stub.Leave(pb.LeaveRequest(lease_id=lease), timeout=10)
    reply = target.stub.Register(pb.RegisterRequest(worker=pb.WorkerInfo(name="after-fuzz")), timeout=10)
    assert len(reply.heads) == 1 and reply.job.total_heads == 4
    total = sum(TALLY.values())
    by_rpc: Counter = Counter()
    for (rpc, _), n in TALLY.items():
        by_rpc[rpc] += n
    lines = [f"fuzz: {total} requests; server up; weights hash unchanged ({target.hash[:16]})"]
    lines += [f"  {rpc:<28} {n:>5}  " + ", ".join(f"{code} {k}" for (r, code), k in sorted(TALLY.items()) if r == rpc) for rpc, n in sorted(by_rpc.items())]  # fmt: skip
    print("\n" + "\n".join(lines))
    if os.environ.get("LTE_FUZZ_REPORT"):
        with open(os.environ["LTE_FUZZ_REPORT"], "w") as fh:
            json.dump(
                {"total": total, "tally": {f"{r} {c}": n for (r, c), n in sorted(TALLY.items())}},
                fh,
                indent=1,
            )
    assert total >= 2000, total
