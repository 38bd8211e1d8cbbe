"""Pushes whose stream broke, kept so that the worker's retry sends only the rest (issue 23, item 4).

Wire protocol 3. A worker names each push with a ``push_id``, the same on every retry of it. While
the server reads a resumable push it keeps the tensor chunk messages it has read, under the
worker's lease. When the stream breaks (a dropped connection, a cut link, a deadline) they stay;
``PushOffset`` tells the worker how many there are, its retry's header carries that count as
``resume_from``, and the server reads the chunks it kept, then the rest from the new stream. Every
chunk passes the same checks as in a push sent in one go, and nothing of a push is merged before
the whole of it has arrived (``Coordinator.apply_push``): a resumed push is the same push.

This is the resumable-upload scheme of HTTP (ask the server for the offset it holds, send from
there), per gRPC stream instead of per byte range.

Bounds: one partial push per lease (a new push of the lease replaces its old one); one kept after
its stream broke is dropped ``keep_s`` seconds later, and the kept ones together hold at most
``max_kept_bytes``, counted as stored (the oldest dropped first). A push being read holds at most
what it carries: the assembler bounds its bytes, and refuses empty chunks inside a tensor, which
would count nothing. A push read to its end, applied or refused, leaves nothing behind.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from lte.common.wire.protocol import Refusal, Refused
from lte.proto import parameter_server_pb2 as pb

KEEP_S = 600.0  # a broken push's chunks wait this long for the worker's retry
MAX_KEPT_BYTES = 1 << 30  # over all leases


class Superseded(Exception):
    """A retry of this push took over its chunks: the stream reading it (a connection that broke
    without the server noticing yet) stops."""


def push_identity(header: pb.PushHeader) -> bytes:
    """The header's bytes without ``resume_from``: equal for every try of one push."""
    copy = pb.PushHeader()
    copy.CopyFrom(header)
    copy.resume_from = 0
    return copy.SerializeToString(deterministic=True)


CHUNK_OVERHEAD = 16  # bytes counted per kept chunk besides its serialised size (its two offsets)


@dataclass
class PartialPush:
    """The chunks of one push read so far, and which stream reads it now. The chunks are kept
    serialised end to end (chunk ``i`` is ``blob[ends[i - 1]:ends[i]]``), not as messages: a message
    object costs hundreds of bytes however few it carries, so a stream of tiny chunks would hold
    far more memory than it counts."""

    lease_id: str
    push_id: int
    identity: bytes
    blob: bytearray = field(default_factory=bytearray)
    ends: array = field(default_factory=lambda: array("Q"))
    payload_ends: array = field(default_factory=lambda: array("Q"))  # payload bytes up to chunk i
    reader: int = 0  # the stream that appends to it (0: none, the push is kept for a retry)
    kept_since: float = 0.0

    @property
    def count(self) -> int:
        return len(self.ends)

    @property
    def payload(self) -> int:
        return self.payload_ends[-1] if self.payload_ends else 0

    @property
    def nbytes(self) -> int:
        """Bytes held, as stored."""
        return len(self.blob) + CHUNK_OVERHEAD * len(self.ends)

    def append(self, chunk: pb.TensorChunk) -> None:
        self.blob += chunk.SerializeToString()
        self.ends.append(len(self.blob))
        self.payload_ends.append(self.payload + len(chunk.data))

    def chunk(self, i: int) -> pb.TensorChunk:
        start = self.ends[i - 1] if i else 0
        return pb.TensorChunk.FromString(bytes(self.blob[start : self.ends[i]]))

    def truncate(self, count: int) -> None:
        del self.blob[self.ends[count - 1] if count else 0 :]
        del self.ends[count:]
        del self.payload_ends[count:]


class PartialPushes:
    """The resumable pushes being read and the broken ones kept, one per lease. Thread-safe."""

    def __init__(
        self,
        keep_s: float = KEEP_S,
        max_kept_bytes: int = MAX_KEPT_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_s, self.max_kept_bytes, self.clock = keep_s, max_kept_bytes, clock
        self._by_lease: dict[str, PartialPush] = {}
        self._lock = threading.Lock()
        self._readers = 0
        self.resumed = 0  # pushes that went on from kept chunks

    def offset(self, lease_id: str, push_id: int) -> tuple[int, int]:
        """``(chunk messages, payload bytes)`` held of ``push_id`` of ``lease_id``; (0, 0) for one
        the server does not hold (never seen, dropped, applied, or the server restarted)."""
        with self._lock:
            self._expire()
            partial = self._by_lease.get(lease_id)
            if partial is None or partial.push_id != push_id:
                return 0, 0
            return partial.count, partial.payload

    def open(self, header: pb.PushHeader) -> tuple[PartialPush, int, int]:
        """Start reading the push of ``header`` (its ``push_id`` > 0): ``(partial, reader, held)``,
        ``held`` the chunks kept of an earlier try that this one skips (``header.resume_from``).

        Raises ``Refused(RESUME_LOST)`` when ``resume_from`` > 0 and the server does not hold that many
        chunks of this very push (dropped meanwhile, or another header): the worker sends it whole."""
        identity = push_identity(header)
        with self._lock:
            self._expire()
            self._readers += 1
            reader = self._readers
            partial = self._by_lease.get(header.lease_id)
            same = partial is not None and partial.push_id == header.push_id and partial.identity == identity
            if header.resume_from > 0:
                if partial is None or not same or header.resume_from > partial.count:
                    held = 0 if partial is None or not same else partial.count
                    raise Refused(
                        Refusal.RESUME_LOST,
                        f"push {header.push_id} asks to resume after {header.resume_from} chunks; the server holds "
                        f"{held}: send the push from its start",
                    )
                assert partial is not None
                partial.truncate(header.resume_from)
                self.resumed += 1
            else:
                partial = PartialPush(header.lease_id, header.push_id, identity)
                self._by_lease[header.lease_id] = partial
            partial.reader = reader
            return partial, reader, partial.count

    def read(
        self, partial: PartialPush, reader: int, held: int, stream: Iterable[pb.UpdateChunk]
    ) -> Iterator[pb.UpdateChunk]:
        """The push's chunk messages: its first ``held`` kept ones, then ``stream``'s, each kept as
        it is read.

        Raises ``Superseded`` when a retry took the push over; what ``stream`` raises when it breaks
        passes through, and the chunks read stay kept for the retry (``close``)."""
        for i in range(held):
            with self._lock:
                if partial.reader != reader:
                    raise Superseded()
                chunk = partial.chunk(i)
            yield pb.UpdateChunk(tensor=chunk)
        for msg in stream:
            with self._lock:
                if partial.reader != reader:
                    raise Superseded()
                if msg.HasField("tensor"):
                    partial.append(msg.tensor)
            yield msg

    def close(self, partial: PartialPush, reader: int, *, keep: bool) -> None:
        """The stream ``reader`` is done with ``partial``: keep its chunks for a retry (``keep``: the
        stream broke) or drop them (the push was read to its end, or refused)."""
        with self._lock:
            if partial.reader != reader:
                return  # a retry owns it now
            if keep:
                partial.reader = 0
                partial.kept_since = self.clock()
                self._expire()
            elif self._by_lease.get(partial.lease_id) is partial:
                del self._by_lease[partial.lease_id]

    def held(self) -> list[tuple[str, int, int, int]]:
        """``(lease_id, push_id, chunk messages, payload bytes)`` of every push held, read now or kept."""
        with self._lock:
            return [(p.lease_id, p.push_id, p.count, p.payload) for p in self._by_lease.values()]

    def kept_bytes(self) -> int:
        """Bytes held (as stored) by the pushes kept for a retry; at most ``max_kept_bytes``."""
        with self._lock:
            return sum(p.nbytes for p in self._by_lease.values() if p.reader == 0)

    def clear(self) -> None:
        """Drop every push held (what a restarted server holds)."""
        with self._lock:
            self._by_lease.clear()

    def _expire(self) -> None:
        """Drop kept pushes older than ``keep_s``, then the oldest until ``max_kept_bytes`` holds (lock held)."""
        now = self.clock()
        kept = sorted((p for p in self._by_lease.values() if p.reader == 0), key=lambda p: p.kept_since)
        total = sum(p.nbytes for p in kept)
        for p in kept:
            if now - p.kept_since <= self.keep_s and total <= self.max_kept_bytes:
                break
            total -= p.nbytes
            del self._by_lease[p.lease_id]
