"""Snapshots of the master weights as workers load them: quantised per the codec policy, zstd'd, chunked.

Built once per version and single-flight: pullers that arrive while a build runs wait for it and
share a build started after they asked, instead of each building the version that the pushes
(async mode: one per push) made meanwhile, back to back.

Delta-coded snapshots: the builder keeps the codec bytes (before zstd) of the last
``delta_history`` versions it built. A worker that holds version v and speaks the delta protocol
gets v -> v' as, per tensor, ``byte_delta(codes(v'), codes(v))`` zstd'd (mostly zeros: a merge moves
few int8 codes, and those by one), or the tensor's full payload where that is smaller; the whole
snapshot when v is no longer kept. The worker adds the delta to the codes it holds and checks the
sum's crc32, so its q(W) is the full snapshot's bit for bit.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import replace

import torch

from lte.common.job.config import JobConfig
from lte.common.wire.chunks import tensor_chunks
from lte.common.wire.codec import EncodedTensor, byte_delta, encode_tensor, zstd_compress
from lte.common.wire.protocol import Role, codec_for, factor_tensors
from lte.proto import parameter_server_pb2 as pb

# zstd level of what the server sends. Level 1 compresses fp32, int8 and nf4 snapshots as well as
# level 3 (within 0.003 of the ratio, at init and with heavy-tailed weights) and builds fp32 and
# int8 snapshots 27-39 % faster; every new version's snapshot pays it (bench/snapshot_build.py).
SNAPSHOT_ZSTD_LEVEL = 1

Snapshot = tuple[int, list[pb.ModelChunk], int]  # (version, chunk messages, payload bytes)
# Versions whose codec bytes the server keeps for deltas: a sync worker is one version behind, an
# async one about as many as there are workers. Each costs one uncompressed snapshot of memory.
DELTA_HISTORY = 4


def encode_messages(job: JobConfig, tensors: Mapping[str, torch.Tensor], role_of: Callable[[str], Role]):
    """Chunk messages of ``tensors`` in the codec of each one's role; returns (messages, payload bytes)."""
    messages, total, _, _ = _encode(job, tensors, role_of)
    return messages, total


def _encode(job: JobConfig, tensors: Mapping[str, torch.Tensor], role_of: Callable[[str], Role]):
    """(messages, payload bytes, {name: EncodedTensor}, {name: codec bytes before zstd})."""
    messages: list[pb.ModelChunk] = []
    encoded: dict[str, EncodedTensor] = {}
    raw: dict[str, bytes] = {}
    total = 0
    for name, tensor in tensors.items():
        plain = encode_tensor(name, tensor.float().cpu(), codec_for(role_of(name), job), None)
        enc = replace(plain, compressed=True, payload=zstd_compress(plain.payload, SNAPSHOT_ZSTD_LEVEL))
        encoded[name], raw[name] = enc, plain.payload
        total += len(enc.payload)
        messages += [pb.ModelChunk(tensor=c) for c in tensor_chunks(enc, job.max_chunk_bytes)]
    return messages, total, encoded, raw


def delta_messages(
    job: JobConfig, encoded: Mapping[str, EncodedTensor], raw: Mapping[str, bytes], base: Mapping[str, bytes]
) -> tuple[list[pb.ModelChunk], int]:
    """Chunk messages taking a holder of ``base`` (codec bytes per tensor) to ``raw``: per tensor the
    zstd'd byte delta with the crc32 of ``raw``, or ``encoded``'s full payload where that is no larger."""
    messages: list[pb.ModelChunk] = []
    total = 0
    for name, enc in encoded.items():
        old = base.get(name)
        if old is not None and len(old) == len(raw[name]):
            packed = zstd_compress(byte_delta(raw[name], old), SNAPSHOT_ZSTD_LEVEL)
            if len(packed) < len(enc.payload):
                enc = replace(enc, payload=packed, delta=True, crc32=zlib.crc32(raw[name]))
        total += len(enc.payload)
        messages += [pb.ModelChunk(tensor=c) for c in tensor_chunks(enc, job.max_chunk_bytes)]
    return messages, total


class SnapshotBuilder:
    """``get(copy_master)``: a snapshot at least as new as the version at the call, built at most once
    per version. ``copy_master`` returns (version, a copy of the master) under the caller's lock."""

    def __init__(self, job: JobConfig, layer_names: list[str], delta_history: int = DELTA_HISTORY) -> None:
        """``delta_history``: earlier versions whose codec bytes are kept for deltas (0: no deltas)."""
        self.job = job
        self._layers = set(layer_names)
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._encoded: dict[str, EncodedTensor] = {}
        self._history: OrderedDict[int, dict[str, bytes]] = OrderedDict()  # version -> codec bytes
        # from version -> (messages, payload bytes) of the delta to the current snapshot
        self._deltas: dict[int, tuple[list[pb.ModelChunk], int]] = {}
        self.delta_history = max(0, delta_history)
        self.builds = 0
        self.delta_builds = 0
        # Resumable pulls: a stream is named by this builder's nonce (new per process and per
        # invalidate: a restart or a restored checkpoint reuses version numbers for other weights)
        self._nonce = secrets.token_bytes(8)

    def invalidate(self) -> None:
        """Forget every snapshot (a restored checkpoint reuses version numbers for other weights).
        No lock: the caller holds the state lock, which a build takes inside this builder's lock."""
        self._snapshot = None
        self._encoded, self._deltas, self._history = {}, {}, OrderedDict()
        self._nonce = secrets.token_bytes(8)

    def _role(self, name: str) -> Role:
        return Role.SNAPSHOT_LAYER if name in self._layers else Role.SNAPSHOT_OTHER

    def get(self, version_now: Callable[[], int], copy_master: Callable[[], tuple[int, dict]]) -> Snapshot:
        asked = version_now()
        with self._lock:
            if self._snapshot is not None and self._snapshot[0] >= asked:
                return self._snapshot
            version, master = copy_master()  # a memcpy under the state lock; encoding runs outside it
            messages, total, encoded, raw = _encode(self.job, master, self._role)
            self._snapshot = (version, messages, total)
            self._encoded, self._deltas = (encoded if self.delta_history > 0 else {}), {}
            if self.delta_history > 0:
                self._history[version] = raw
                while len(self._history) > self.delta_history + 1:  # the current one and the kept ones
                    self._history.popitem(last=False)
            self.builds += 1
            return self._snapshot

    def delta(self, to_version: int, from_version: int) -> tuple[list[pb.ModelChunk], int] | None:
        """(messages, payload bytes) taking a worker from ``from_version`` to ``to_version``, the
        current snapshot; None when either is no longer kept (the caller sends the full snapshot).
        Built once per (from, to) pair: the workers of a sync round all share one."""
        with self._lock:
            if self._snapshot is None or self._snapshot[0] != to_version or from_version >= to_version:
                return None
            if from_version not in self._deltas:
                base, raw = self._history.get(from_version), self._history.get(to_version)
                if base is None or raw is None:
                    return None
                self._deltas[from_version] = delta_messages(self.job, self._encoded, raw, base)
                self.delta_builds += 1
            return self._deltas[from_version]

    def stream_id(self, version: int, delta_base: int, head_factors) -> int:
        """A nonzero 62-bit name of the chunk sequence a pull of ``version`` (a delta against
        ``delta_base``, -1: the whole snapshot) with ``head_factors`` gets: equal names, equal
        chunks, as long as this builder keeps that version (a resumed pull skips the ones it has)."""
        key = f"{version}/{delta_base}/{','.join(map(str, head_factors))}".encode()
        digest = hashlib.blake2b(key, key=self._nonce, digest_size=8).digest()
        return (int.from_bytes(digest, "big") >> 2) | 1

    def factor_messages(self, factors) -> list[pb.ModelChunk]:
        """Chunk messages of heads' last merged factors ``{head: {layer: (B, A)}}``, exact."""
        return encode_messages(self.job, factor_tensors(factors), lambda _: Role.MERGED_FACTOR)[0]


def master_for_snapshot(
    master: Mapping[str, torch.Tensor], layer_names: Iterable[str], ties: Container[str]
) -> dict[str, torch.Tensor]:
    """The copy of ``master`` a snapshot is built from: each LTE layer's weight as its ``[m, n]``
    matrix (a conv kernel ``[out, in, kh, kw]`` as ``[out, in*kh*kw]``), every other tensor as it is,
    a tied alias left out (its owner carries the value). A memcpy: the coordinator takes it under
    its lock, the emulator (``lte-sim``) once per round; the encoding runs on the copy."""
    layers = set(layer_names)
    return {
        name: (t.flatten(1) if name in layers else t).detach().clone()
        for name, t in master.items()
        if name not in ties
    }
