"""Snapshots of the master weights as workers load them: quantised per the codec policy, zstd'd, chunked.

Built once per version and single-flight: pullers that arrive while a build runs wait for it and
share a build started after they asked, instead of each building the version that the pushes
(async mode: one per push) made meanwhile, back to back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch

from lte.common.codec import encode_tensor
from lte.common.config import JobConfig
from lte.common.protocol import Role, codec_for, factor_tensors
from lte.common.wire import tensor_chunks
from lte.proto import parameter_server_pb2 as pb

# zstd level of what the server sends. Level 1 compresses fp32, int8 and nf4 snapshots as well as
# level 3 (within 0.003 of the ratio, at init and with heavy-tailed weights) and builds fp32 and
# int8 snapshots 27-39 % faster; every new version's snapshot pays it (bench/snapshot_build.py).
SNAPSHOT_ZSTD_LEVEL = 1

Snapshot = tuple[int, list[pb.ModelChunk], int]  # (version, chunk messages, payload bytes)


def encode_messages(job: JobConfig, tensors: Mapping[str, torch.Tensor], role_of: Callable[[str], Role]):
    """Chunk messages of ``tensors`` in the codec of each one's role; returns (messages, payload bytes)."""
    messages: list[pb.ModelChunk] = []
    total = 0
    for name, tensor in tensors.items():
        enc = encode_tensor(name, tensor.float().cpu(), codec_for(role_of(name), job), SNAPSHOT_ZSTD_LEVEL)
        total += len(enc.payload)
        messages += [pb.ModelChunk(tensor=c) for c in tensor_chunks(enc, job.max_chunk_bytes)]
    return messages, total


class SnapshotBuilder:
    """``get(copy_master)``: a snapshot at least as new as the version at the call, built at most once
    per version. ``copy_master`` returns (version, a copy of the master) under the caller's lock."""

    def __init__(self, job: JobConfig, layer_names: list[str]) -> None:
        self.job = job
        self._layers = set(layer_names)
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self.builds = 0

    def invalidate(self) -> None:
        self._snapshot = None

    def _role(self, name: str) -> Role:
        return Role.SNAPSHOT_LAYER if name in self._layers else Role.SNAPSHOT_OTHER

    def get(self, version_now: Callable[[], int], copy_master: Callable[[], tuple[int, dict]]) -> Snapshot:
        asked = version_now()
        with self._lock:
            if self._snapshot is not None and self._snapshot[0] >= asked:
                return self._snapshot
            version, master = copy_master()  # a memcpy under the state lock; encoding runs outside it
            messages, total = encode_messages(self.job, master, self._role)
            self._snapshot = (version, messages, total)
            self.builds += 1
            return self._snapshot

    def factor_messages(self, factors) -> list[pb.ModelChunk]:
        """Chunk messages of heads' last merged factors ``{head: {layer: (B, A)}}``, exact."""
        return encode_messages(self.job, factor_tensors(factors), lambda _: Role.MERGED_FACTOR)[0]
