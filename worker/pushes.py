"""How the worker sends a push: the live factors rounded to what the uplink codec carries (so both
sides hold the same ``B', A'``), the update streamed as a header and bounded chunks, under a
deadline that grows with its bytes, a broken one resumed from what the server holds. Which heads a
push carries and what its reply means is ``Worker``'s part (``push``, ``_push_turn``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from lte.common.core.model_state import lte_layers
from lte.common.job.config import JobConfig
from lte.common.job.trainer import LocalTrainer
from lte.common.wire.chunks import tensor_chunks
from lte.common.wire.codec import EncodedTensor, get_codec
from lte.common.wire.protocol import PushMeta, Refusal, Role, codec_for
from lte.proto import parameter_server_pb2 as pb
from lte.worker.rpc import RpcCaller, refusal

# A push's deadline grows with its bytes: PUSH_BASE_S plus their time at PUSH_FLOOR_BPS (a fixed
# 600 s failed every push of more than 75 MB on a 1 Mbit/s uplink, and retried it from the start)
PUSH_BASE_S = 600.0
PUSH_FLOOR_BPS = 1e6


def push_deadline_s(payload_bytes: int) -> float:
    """Seconds a push of ``payload_bytes`` may take: ``PUSH_BASE_S`` + the bytes at ``PUSH_FLOOR_BPS``
    (17 MB of vit-b fp16 factors: 736 s; 150 MB: 1800 s)."""
    return PUSH_BASE_S + 8.0 * payload_bytes / PUSH_FLOOR_BPS


def round_factors_to_wire(trainer: LocalTrainer, job: JobConfig) -> None:
    """Make the live factors exactly what the server will hold, so both sides agree on B', A'."""
    codec = get_codec(codec_for(Role.HEAD_FACTOR, job))
    if job.uplink == "fp32" and job.dtype == "float32":
        return
    with torch.no_grad():
        for layer in lte_layers(trainer.model).values():
            for p in (layer.lora_A, layer.lora_B):
                value = p.detach().float().cpu()
                if layer.transposed:  # its factors travel transposed (LTEConv1D.wire_factors)
                    value = value.mT.contiguous()
                sent = codec.decode(codec.encode(value), tuple(value.shape))
                p.copy_((sent.mT if layer.transposed else sent).to(p.device, p.dtype))


class PushSender:
    """Sends the worker's pushes: a header and bounded chunks under a deadline that grows with their
    bytes, retried by ``rpc`` with the same round ids (the server applies a push at most once).

    A push whose stream broke goes on where it stopped (wire protocol 3, ``server/partial_pushes.py``):
    every try carries the push's ``push_id``; a retry first asks ``PushOffset`` how many chunks the
    server holds and sends only the rest. An older server (no ``PushOffset``), or one that no longer
    holds them (restarted, or dropped them: ``Refusal.RESUME_LOST``), gets the push whole."""

    def __init__(self, rpc: RpcCaller, stub_of: Callable[[], Any]) -> None:
        """``stub_of``: the worker's current stub (a bench may wrap the worker's channel after the start)."""
        self.rpc, self.stub_of = rpc, stub_of
        self.payload_sent = 0  # tensor bytes put on the wire, every try counted
        self.resumed = 0  # tries that went on from chunks the server held
        self.answered_at = -math.inf  # when this push's last PushOffset was answered

    def send(self, meta: PushMeta, encoded: list[EncodedTensor], max_chunk_bytes: int) -> pb.PushReply:
        """One push; raises what ``rpc.call`` raises (refusals as the worker's exceptions)."""
        push_id = secrets.randbits(63) or 1
        total = sum(len(e.payload) for e in encoded)
        tries = 0

        def attempt(metadata) -> pb.PushReply:
            nonlocal tries
            skip, held = self._held(meta.lease_id, push_id, metadata) if tries else (0, 0)
            tries += 1
            try:
                return self._stream(meta, encoded, max_chunk_bytes, push_id, skip, total - held, metadata)
            except grpc.RpcError as err:
                if not skip or refusal(err) is not Refusal.RESUME_LOST:
                    raise
                self.resumed -= 1  # the server no longer held them
                self.rpc.say(f"push: {err.details()}")
                return self._stream(meta, encoded, max_chunk_bytes, push_id, 0, total, metadata)

        self.answered_at = -math.inf
        return self.rpc.call(attempt, what="push", answered=lambda: self.answered_at)

    def _held(self, lease_id: str, push_id: int, metadata) -> tuple[int, int]:
        """(chunks, bytes) of this push the server holds from an earlier try; (0, 0) from an older server."""
        try:
            reply = self.stub_of().PushOffset(
                pb.PushOffsetRequest(lease_id=lease_id, push_id=push_id), metadata=metadata, timeout=30
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                return 0, 0
            raise
        self.answered_at = self.rpc.clock()  # the server is reachable: retry as long as it keeps so
        if reply.chunks_received:
            self.resumed += 1
            self.rpc.say(
                f"push: the server holds {reply.chunks_received} chunks "
                f"({reply.bytes_received / 1e6:.2f} MB) of it; sending the rest"
            )
        return reply.chunks_received, reply.bytes_received

    def _stream(
        self,
        meta: PushMeta,
        encoded: list[EncodedTensor],
        max_chunk_bytes: int,
        push_id: int,
        skip: int,
        remaining_bytes: int,
        metadata,
    ) -> pb.PushReply:
        header = meta.to_proto()
        header.push_id, header.resume_from = push_id, skip
        return self.stub_of().PushUpdate(
            self._messages(header, encoded, max_chunk_bytes, skip),
            metadata=metadata,
            timeout=push_deadline_s(max(0, remaining_bytes)),
        )

    def _messages(
        self, header: pb.PushHeader, encoded: list[EncodedTensor], max_chunk_bytes: int, skip: int
    ) -> Iterator[pb.UpdateChunk]:
        """The ``PushUpdate`` stream: the header, then every tensor in chunks of ``max_chunk_bytes``
        after the first ``skip`` chunk messages."""
        yield pb.UpdateChunk(header=header)
        number = 0
        for enc in encoded:
            chunks = max(1, -(-len(enc.payload) // max_chunk_bytes))  # tensor_chunks' count
            if number + chunks <= skip:  # all held by the server: not even cut into chunks
                number += chunks
                continue
            for chunk in tensor_chunks(enc, max_chunk_bytes):
                number += 1
                if number > skip:
                    self.payload_sent += len(chunk.data)
                    yield pb.UpdateChunk(tensor=chunk)
