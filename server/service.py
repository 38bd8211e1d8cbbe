"""The ``lte.v1.ParameterServer`` gRPC service: validate every request, then hand it to the coordinator."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator

import grpc

from lte.common.codec import CodecError, decode_tensor
from lte.common.config import JobConfig
from lte.common.wire import TensorAssembler, WireError
from lte.proto import parameter_server_pb2 as pb
from lte.proto import parameter_server_pb2_grpc as pb_grpc
from lte.server.coordinator import Coordinator, PushHeaderInfo, Refused

MAX_WAIT_S = 60.0  # longest long-poll a pull may ask for
PULL_RETRY_AFTER_S = 1.0  # what a pull turned away from a long-poll is told to wait
MAX_HEADS_PER_PUSH = 4096


def job_to_proto(job: JobConfig) -> pb.JobConfig:
    return pb.JobConfig(
        model=job.model,
        image_size=job.image_size,
        in_channels=job.in_channels,
        num_classes=job.num_classes,
        patch_size=job.patch_size,
        dataset=job.dataset,
        task=job.task,
        total_heads=job.heads,
        rank=job.rank,
        alpha=job.alpha,
        merge_every=job.merge_every,
        reset=job.reset,
        a_init=job.a_init,
        a_init_gain=job.a_init_gain,
        snapshot_codec=job.snapshot_codec,
        uplink_codec=job.uplink,
        lr=job.lr,
        weight_decay=job.weight_decay,
        warmup_steps=job.warmup_steps,
        total_steps=job.steps,
        min_lr_ratio=job.min_lr_ratio,
        batch_size=job.batch_size,
        seed=job.seed,
        mode=job.mode,
        max_chunk_bytes=job.max_chunk_bytes,
        beta1=job.beta1,
        beta2=job.beta2,
        eps=job.eps,
        compute_dtype=job.dtype,
        zstd_level=job.zstd_level,
    )


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
        self._waiting = threading.BoundedSemaphore(max_waiting_pulls) if max_waiting_pulls > 0 else None

    # Each handler turns a Refused into its status; anything else is a server bug and says so.
    def _abort(self, context: grpc.ServicerContext, exc: Refused) -> None:
        context.abort(exc.code, exc.message)

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        w = request.worker
        if not 0 <= w.max_heads <= MAX_HEADS_PER_PUSH:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_heads must be in [0, {MAX_HEADS_PER_PUSH}], got {w.max_heads}",
            )
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
        }
        try:
            lease, heads = self.c.register(info)
        except Refused as exc:
            self._abort(context, exc)
        return pb.RegisterReply(
            worker_id=lease.worker_id,
            lease_id=lease.lease_id,
            heads=[
                pb.HeadAssignment(
                    head_id=h.head_id,
                    next_round=h.next_round,
                    steps_done=h.steps_done,
                    has_factors=h.head_id in self.c.prev_factors,
                )
                for h in heads
            ],
            job=job_to_proto(self.c.job),
            heartbeat_interval_s=self.c.heartbeat_interval_s,
            lease_timeout_s=self.c.lease_timeout_s,
            version=self.c.version,
        )

    def PullModel(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.ModelChunk]:
        if not math.isfinite(request.wait_newer_s) or request.wait_newer_s < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"wait_newer_s must be finite and >= 0, got {request.wait_newer_s}",
            )
        if request.have_version < -1:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"have_version must be >= -1, got {request.have_version}"
            )
        try:
            with self.c.lock:
                lease = self.c.lease(request.lease_id)
            factor_msgs = (
                self.c.head_factor_messages(lease, list(request.head_factors)) if request.head_factors else []
            )
        except Refused as exc:
            self._abort(context, exc)
        wait_s, retry_after_s = min(request.wait_newer_s, MAX_WAIT_S), 0.0
        slot = wait_s > 0 and self._waiting is not None
        if slot and not self._waiting.acquire(blocking=False):
            slot, wait_s, retry_after_s = False, 0.0, PULL_RETRY_AFTER_S
            with self.c.lock:
                self.c.pulls_turned_away += 1
        try:
            version, done = self.c.wait_for_version(request.have_version, wait_s)
        finally:
            if slot:
                self._waiting.release()
        if version <= request.have_version and not factor_msgs:
            header = pb.ModelHeader(version=version, current=True, done=done, retry_after_s=retry_after_s)
            yield pb.ModelChunk(header=header)
            return
        version, messages, payload = self.c.snapshot_messages()
        if version <= request.have_version:
            messages, payload = [], 0
        messages = messages + factor_msgs
        sent = 0
        yield pb.ModelChunk(
            header=pb.ModelHeader(
                version=version,
                current=not messages,
                done=done,
                num_tensors=sum(m.tensor.HasField("header") for m in messages),
                total_payload_bytes=payload,
            )
        )
        for m in messages:
            sent += len(m.tensor.data)
            yield m
        with self.c.lock:
            self.c.bytes_down += sent
            lease.bytes_down += sent
            lease.version = version

    def PushUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.PushReply:
        try:
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with its PushHeader")
            h = first.header
            if len(h.heads) > MAX_HEADS_PER_PUSH:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"push names {len(h.heads)} heads")
            rounds: dict[int, int] = {}
            for hr in h.heads:
                if hr.head_id in rounds:
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT, f"head {hr.head_id} named twice in one push"
                    )
                if hr.round < 0:
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT, f"head {hr.head_id} has negative round {hr.round}"
                    )
                rounds[hr.head_id] = hr.round
            header = PushHeaderInfo(
                h.lease_id, h.base_version, rounds, h.steps, h.samples, h.train_loss, h.seconds
            )
            lease = self.c.check_push_header(header)
            expected = self.c.expected_tensors(sorted(rounds))
            assembler = TensorAssembler(
                max_chunk_bytes=self.c.job.max_chunk_bytes,
                max_tensor_bytes=self.c.max_push_bytes(1),
                max_total_bytes=self.c.max_push_bytes(len(rounds)),
                max_tensors=len(expected),
            )
            tensors = {}
            for msg in request_iterator:
                if not msg.HasField("tensor"):
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT, "only tensor chunks may follow the PushHeader"
                    )
                enc = assembler.add(msg.tensor)
                if enc is None:
                    continue
                if enc.name not in expected:
                    raise Refused(
                        grpc.StatusCode.INVALID_ARGUMENT, f"unexpected tensor {enc.name!r} in this push"
                    )
                tensor = decode_tensor(enc, max_elements=max(1, math.prod(expected[enc.name]))).float()
                self.c.validate_tensor(enc.name, tensor, enc.codec, expected)
                tensors[enc.name] = tensor
            assembler.finish()
            missing = sorted(set(expected) - set(tensors))
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"push is missing tensors {missing[:3]}{more}"
                )
            if h.num_tensors != len(expected):
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"push header announces {h.num_tensors} tensors; {len(rounds)} head(s) of this job "
                    f"need {len(expected)} (B and A per layer and head, and the replicas)",
                )
            with self.c.lock:
                self.c.bytes_up += assembler.total_bytes
                lease.bytes_up += assembler.total_bytes
            result = self.c.apply_push(header, tensors)
        except Refused as exc:
            self._abort(context, exc)
        except (WireError, CodecError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.PushReply(**result)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        if not math.isfinite(request.samples_per_s) or request.samples_per_s < 0:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"samples_per_s must be finite and >= 0, got {request.samples_per_s}",
            )
        try:
            version, done = self.c.heartbeat(
                request.lease_id, request.version, request.samples_per_s, request.state[:32]
            )
        except Refused as exc:
            self._abort(context, exc)
        return pb.HeartbeatReply(version=version, done=done)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        self.c.leave(request.lease_id)
        return pb.LeaveReply()
