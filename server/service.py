"""The ``lte.v1.ParameterServer`` gRPC service: validate every request, then hand it to the coordinator."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator

import grpc
import torch

from lte.common.wire.chunks import TensorAssembler, WireError
from lte.common.wire.codec import CodecError, decode_tensor
from lte.common.wire.protocol import (
    PROTOCOL_VERSION,
    REFUSAL_KEY,
    PushMeta,
    Refusal,
    Refused,
    job_to_proto,
)
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server.coordinator import Coordinator
from lte.server.partial_pushes import PartialPushes, Superseded
from lte.server.push_check import IncomingPush
from lte.server.scheduler import HeadState

MAX_WAIT_S = 60.0  # longest long-poll a pull may ask for
PULL_RETRY_AFTER_S = 1.0  # what a pull turned away from a long-poll is told to wait
MAX_HEADS_PER_PUSH = 4096
DELTA_PROTOCOL = 1  # the delta-coded snapshot protocol this server speaks (PullRequest.delta_protocol)

# The one table from a domain refusal to a gRPC status; the reason itself travels as trailing
# metadata (REFUSAL_KEY), and that is what a worker acts on.
STATUS_OF = {
    Refusal.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.UNKNOWN_LEASE: grpc.StatusCode.NOT_FOUND,
    Refusal.LEASE_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.LEASE_ENDED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.HEAD_NOT_LEASED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.HEAD_MOVED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.HEAD_FINISHED: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.OUT_OF_STEP: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.STALE: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.VERSION_OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    Refusal.JOB_DONE: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.OUTLIER: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.QUARANTINED: grpc.StatusCode.PERMISSION_DENIED,
    Refusal.INCOMPATIBLE: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.MODEL_DIFFERS: grpc.StatusCode.FAILED_PRECONDITION,
    Refusal.RESUME_LOST: grpc.StatusCode.ABORTED,
}


class EndedEarly(Refused):
    """The push's stream ended before the push was whole. gRPC may end a stream whose connection
    dropped as if the worker had closed it, so a resumable push's chunks are kept for the retry."""


def head_assignments(heads: list[HeadState], has_factors: dict[int, bool]) -> list[pb.HeadAssignment]:
    return [
        pb.HeadAssignment(
            head_id=h.head_id,
            next_round=h.next_round,
            steps_done=h.steps_done,
            has_factors=has_factors.get(h.head_id, False),
        )
        for h in heads
    ]


def _peer_host(context: grpc.ServicerContext) -> str:
    peer = context.peer() or ""
    return peer.split(":", 1)[1].rsplit(":", 1)[0] if ":" in peer else peer


class ParameterServerService(pb_grpc.ParameterServerServicer):
    def __init__(self, coordinator: Coordinator, max_waiting_pulls: int = 0) -> None:
        """``max_waiting_pulls``: long-polls that may block a handler thread at once (0: no limit).

        The sync server runs every RPC on a fixed thread pool. A long-poll holds its thread until
        the round closes; with as many waiting workers as threads, the pushes that close the round
        and the heartbeats that keep leases alive queue behind them until a poll times out
        (tests/test_cluster.py, ``-k starve``). Pulls past the limit are answered at once with
        ``retry_after_s``, and the worker polls again after that.
        """
        self.c = coordinator
        self.partial_pushes = PartialPushes()
        self._waiting = threading.BoundedSemaphore(max_waiting_pulls) if max_waiting_pulls > 0 else None

    # Each handler turns a Refused into its status and reason; anything else is a server bug and says so.
    def _abort(self, context: grpc.ServicerContext, exc: Refused) -> None:
        context.set_trailing_metadata(((REFUSAL_KEY, exc.reason.value),))
        context.abort(STATUS_OF[exc.reason], exc.message)

    def _malformed(self, context: grpc.ServicerContext, message: str) -> None:
        self._abort(context, Refused(Refusal.MALFORMED, message))

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        w = request.worker
        if not 0 <= w.max_heads <= MAX_HEADS_PER_PUSH:
            self._malformed(context, f"max_heads must be in [0, {MAX_HEADS_PER_PUSH}], got {w.max_heads}")
        info = {
            "name": w.name[:200] or w.hostname[:200] or _peer_host(context),
            "device": w.device[:64],
            "free_memory_bytes": max(0, w.free_memory_bytes),
            "max_heads": w.max_heads,
            "hostname": w.hostname[:200],
            "pid": w.pid,
            "lte_version": w.lte_version[:32],
            "preferred_heads": [
                h for h in w.preferred_heads[:MAX_HEADS_PER_PUSH] if 0 <= h < self.c.job.heads
            ],
            "peer": context.peer(),
            "peer_host": _peer_host(
                context
            ),  # with the name: who a quarantine shuts out (leases.worker_identity)
            "protocol_version": w.protocol_version,
            "job_fields": [name[:64] for name in w.job_fields[:1024]],
        }
        try:
            lease, heads = self.c.register(info)
            _, heads, has_factors = self.c.lease_view(lease.lease_id)
        except Refused as exc:
            self._abort(context, exc)
        return pb.RegisterReply(
            worker_id=lease.worker_id,
            lease_id=lease.lease_id,
            heads=head_assignments(heads, has_factors),
            job=job_to_proto(self.c.job),
            heartbeat_interval_s=self.c.heartbeat_interval_s,
            lease_timeout_s=self.c.lease_timeout_s,
            version=self.c.version,
            room=lease.room,
            model_fingerprint=self.c.fingerprint[0],
            model_tree=self.c.fingerprint[1],
            protocol_version=PROTOCOL_VERSION,
            lease_epoch=lease.epoch,
        )

    def PullModel(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        if not math.isfinite(request.wait_newer_s) or request.wait_newer_s < 0:
            self._malformed(context, f"wait_newer_s must be finite and >= 0, got {request.wait_newer_s}")
        if request.have_version < -1:
            self._malformed(context, f"have_version must be >= -1, got {request.have_version}")
        if request.resume_from < 0:
            self._malformed(context, f"resume_from must be >= 0, got {request.resume_from}")
        try:
            lease, factor_msgs = self.c.begin_pull(
                request.lease_id,
                list(request.head_factors),
                (request.model_fingerprint, request.model_tree),
            )
        except Refused as exc:
            self._abort(context, exc)
        wait_s = min(request.wait_newer_s, MAX_WAIT_S)
        version, done, turned_away = self.c.wait_for_version(
            request.have_version, wait_s, lease, request.lease_epoch, slots=self._waiting
        )
        retry_after_s = PULL_RETRY_AFTER_S if turned_away else 0.0
        if version <= request.have_version and not factor_msgs:
            header = pb.ModelHeader(
                version=version, current=True, done=done, retry_after_s=retry_after_s, lease_epoch=lease.epoch
            )
            yield pb.ModelChunk(header=header)
            return
        version, messages, payload, delta_base, stream_id = self.c.pull_snapshot(
            request.have_version, request.delta_protocol >= DELTA_PROTOCOL, list(request.head_factors)
        )
        messages = messages + factor_msgs
        sent = 0
        # a pull that broke after some chunks asks for the same stream again: skip what it has
        skip = 0
        if request.resume_stream == stream_id and request.resume_from <= len(messages):
            skip = request.resume_from
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                version=version,
                current=not messages,
                done=done,
                num_tensors=sum(m.tensor.HasField("header") for m in messages),
                total_payload_bytes=payload,
                lease_epoch=lease.epoch,
                delta_base=delta_base,
                stream_id=stream_id,
                resumed_from=skip,
                num_chunks=len(messages),
            )
        )
        for m in messages[skip:]:
            sent += len(m.tensor.data)
            yield m
        self.c.count_sent(lease, sent, version)

    def PushUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.PushReply:
        opened = None  # a resumable push: (partial, reader), kept for a retry if its stream breaks
        broke = True
        try:
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise Refused(Refusal.MALFORMED, "a push must start with its PushHeader")
            if first.header.push_id < 0 or first.header.resume_from < 0:
                raise Refused(Refusal.MALFORMED, "push_id and resume_from must be >= 0")
            if first.header.resume_from and not first.header.push_id:
                raise Refused(Refusal.MALFORMED, "resume_from needs the push's push_id")
            try:
                header = PushMeta.from_proto(first.header, MAX_HEADS_PER_PUSH)
            except ValueError as exc:
                raise Refused(Refusal.MALFORMED, str(exc)) from None
            push = self.c.begin_push(header)
            messages: Iterable[pb.UpdateChunk] = request_iterator
            if first.header.push_id:
                partial, reader, held = self.partial_pushes.open(first.header)
                opened = partial, reader
                messages = self.partial_pushes.read(partial, reader, held, request_iterator)
            tensors, total_bytes = self._read_push(messages, push, header)
            broke = False
            if opened is not None:  # read whole: its chunks are not needed through the merge
                self.partial_pushes.close(*opened, keep=False)
                opened = None
            result = self.c.apply_push(header, tensors, push, total_bytes)
        except EndedEarly as exc:  # a dropped connection can end the stream as if the worker had
            self._abort(context, exc)  # closed it: keep what came (broke), refuse the push itself
        except Refused as exc:
            broke = False
            self._abort(context, exc)
        except (WireError, CodecError) as exc:
            broke = False
            self._malformed(context, str(exc))
        except Superseded:
            context.abort(grpc.StatusCode.CANCELLED, "a retry of this push took over its chunks")
        finally:
            if opened is not None:
                self.partial_pushes.close(*opened, keep=broke)
        return pb.PushReply(**result)

    def _read_push(
        self, messages: Iterable[pb.UpdateChunk], push: IncomingPush, header: PushMeta
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The push's tensors, each checked as it arrives, and their payload bytes."""
        assembler = TensorAssembler(
            max_chunk_bytes=push.max_chunk_bytes,
            max_tensor_bytes=push.max_tensor_bytes,
            max_total_bytes=push.max_total_bytes,
            max_tensors=len(push.expected),
        )
        tensors = {}
        for msg in messages:
            if not msg.HasField("tensor"):
                raise Refused(Refusal.MALFORMED, "only tensor chunks may follow the PushHeader")
            enc = assembler.add(msg.tensor)
            if enc is None:
                continue
            if enc.name not in push.expected:
                raise Refused(Refusal.MALFORMED, f"unexpected tensor {enc.name!r} in this push")
            tensor = decode_tensor(enc, max_elements=max(1, math.prod(push.expected[enc.name]))).float()
            push.check_tensor(enc.name, tensor, enc.codec)
            tensors[enc.name] = tensor
        try:
            assembler.finish()
        except WireError as exc:
            raise EndedEarly(Refusal.MALFORMED, str(exc)) from None
        missing = sorted(set(push.expected) - set(tensors))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise EndedEarly(Refusal.MALFORMED, f"push is missing tensors {missing[:3]}{more}")
        if header.num_tensors != len(push.expected):
            raise Refused(
                Refusal.MALFORMED,
                f"push header announces {header.num_tensors} tensors; {len(header.head_rounds)} head(s) of "
                f"this job need {len(push.expected)} (B and A per layer and head, and the replicas)",
            )
        return tensors, assembler.total_bytes

    def PushOffset(self, request: pb.PushOffsetRequest, context: grpc.ServicerContext) -> pb.PushOffsetReply:
        """How much of a broken push the server holds (``server/partial_pushes.py``)."""
        if request.push_id <= 0:
            self._malformed(context, f"push_id must be > 0, got {request.push_id}")
        chunks, nbytes = self.partial_pushes.offset(request.lease_id[:200], request.push_id)
        return pb.PushOffsetReply(chunks_received=chunks, bytes_received=nbytes)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        if not math.isfinite(request.samples_per_s) or request.samples_per_s < 0:
            self._malformed(context, f"samples_per_s must be finite and >= 0, got {request.samples_per_s}")
        try:
            version, done = self.c.heartbeat(
                request.lease_id, request.version, request.samples_per_s, request.state[:32]
            )
            lease, heads, has_factors = self.c.lease_view(request.lease_id)
        except Refused as exc:
            self._abort(context, exc)
        return pb.HeartbeatReply(
            version=version,
            done=done,
            lease_epoch=lease.epoch,
            heads=head_assignments(heads, has_factors),
            room=lease.room,
        )

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        self.c.leave(request.lease_id, request.reason[:500])
        return pb.LeaveReply()
