"""How the worker sends a push: the live factors rounded to what the uplink codec carries (so both
sides hold the same ``B', A'``), the update streamed as a header and bounded chunks, under a
deadline that grows with its bytes. Which heads a push carries and what its reply means is
``Worker``'s part (``push``, ``_push_turn``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lte.common.core.model_state import lte_layers
from lte.common.job.config import JobConfig
from lte.common.job.trainer import LocalTrainer
from lte.common.wire.chunks import tensor_chunks
from lte.common.wire.codec import EncodedTensor, get_codec
from lte.common.wire.protocol import PushMeta, Role, codec_for
from lte.proto import parameter_server_pb2 as pb
from lte.worker.rpc import RpcCaller

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


def push_messages(
    meta: PushMeta, encoded: list[EncodedTensor], max_chunk_bytes: int
) -> Iterator[pb.UpdateChunk]:
    """The ``PushUpdate`` stream: the header, then every tensor in chunks of ``max_chunk_bytes``."""
    yield pb.UpdateChunk(header=meta.to_proto())
    for enc in encoded:
        for chunk in tensor_chunks(enc, max_chunk_bytes):
            yield pb.UpdateChunk(tensor=chunk)


def send_update(
    rpc: RpcCaller, push_update: Callable, meta: PushMeta, encoded: list[EncodedTensor], max_chunk_bytes: int
) -> pb.PushReply:
    """One push (``push_update``: the stub's ``PushUpdate``), retried by ``rpc`` as a whole with the
    same round ids (the server applies it at most once), under ``push_deadline_s`` of its bytes."""
    timeout = push_deadline_s(sum(len(e.payload) for e in encoded))
    return rpc.call(
        lambda metadata: push_update(
            push_messages(meta, encoded, max_chunk_bytes), metadata=metadata, timeout=timeout
        ),
        what="push",
    )
