"""Tensors as streams of ``lte.v1.TensorChunk`` messages, and back, validated chunk by chunk.

A tensor is sent as one or more chunks of at most ``max_chunk_bytes``; the first chunk carries
its header (name, dtype, shape, codec, zstd, sizes). ``TensorAssembler`` refuses anything out of
order or over a bound before it allocates, and never sees a pickle.
"""

from __future__ import annotations

from collections.abc import Iterator

from lte.common.wire.codec import EncodedTensor, iter_chunks
from lte.proto import parameter_server_pb2 as pb


class WireError(ValueError):
    """A stream that breaks the wire rules; the message says what and where."""


def tensor_chunks(enc: EncodedTensor, max_chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    header = pb.TensorHeader(
        name=enc.name,
        dtype=enc.dtype,
        shape=list(enc.shape),
        codec=enc.codec,
        zstd=enc.compressed,
        raw_nbytes=enc.raw_nbytes,
        payload_nbytes=len(enc.payload),
        delta=enc.delta,
        raw_crc32=enc.crc32,
    )
    for i, piece in enumerate(iter_chunks(enc.payload, max_chunk_bytes)):
        yield pb.TensorChunk(header=header if i == 0 else None, data=bytes(piece))


class TensorAssembler:
    """Feeds on ``TensorChunk`` messages and yields complete ``EncodedTensor`` objects."""

    def __init__(
        self, *, max_chunk_bytes: int, max_tensor_bytes: int, max_total_bytes: int, max_tensors: int
    ) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.max_tensor_bytes = max_tensor_bytes
        self.max_total_bytes = max_total_bytes
        self.max_tensors = max_tensors
        self.total_bytes = 0
        self.names: set[str] = set()
        self._header: pb.TensorHeader | None = None
        self._parts: list[bytes] = []
        self._received = 0

    def add(self, chunk: pb.TensorChunk) -> EncodedTensor | None:
        """Take one chunk; return the tensor it completes, if any."""
        if len(chunk.data) > self.max_chunk_bytes:
            raise WireError(
                f"chunk of {len(chunk.data)} bytes exceeds the {self.max_chunk_bytes}-byte chunk limit"
            )
        if chunk.HasField("header"):
            if self._header is not None:
                raise WireError(
                    f"tensor {self._header.name!r} is incomplete ({self._received} of "
                    f"{self._header.payload_nbytes} bytes) when a new header arrived"
                )
            header = self._start(chunk.header)
        elif self._header is None:
            raise WireError("a tensor chunk without a header arrived outside any tensor")
        elif not chunk.data:
            # only a tensor's first chunk may be empty (an empty tensor): empty ones after it would
            # cost memory and time without bound while counting nothing against the byte limits
            raise WireError(f"an empty chunk inside tensor {self._header.name!r}")
        else:
            header = self._header
        self._received += len(chunk.data)
        self.total_bytes += len(chunk.data)
        if self._received > header.payload_nbytes:
            raise WireError(
                f"tensor {header.name!r} sent more than its declared {header.payload_nbytes} bytes"
            )
        if self.total_bytes > self.max_total_bytes:
            raise WireError(f"stream exceeds {self.max_total_bytes} bytes in all")
        self._parts.append(chunk.data)
        if self._received < header.payload_nbytes:
            return None
        payload = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._header, self._parts, self._received = None, [], 0
        return EncodedTensor(
            name=header.name,
            dtype=header.dtype,
            shape=tuple(header.shape),
            codec=header.codec,
            compressed=header.zstd,
            payload=payload,
            raw_nbytes=header.raw_nbytes,
            delta=header.delta,
            crc32=header.raw_crc32,
        )

    def _start(self, header: pb.TensorHeader) -> pb.TensorHeader:
        if not header.name:
            raise WireError("tensor header without a name")
        if header.name in self.names:
            raise WireError(f"tensor {header.name!r} sent twice")
        if len(self.names) >= self.max_tensors:
            raise WireError(f"more than {self.max_tensors} tensors in one stream")
        if not 0 <= header.payload_nbytes <= self.max_tensor_bytes:
            raise WireError(
                f"tensor {header.name!r} declares {header.payload_nbytes} bytes; the limit is {self.max_tensor_bytes}"
            )
        self.names.add(header.name)
        self._header = header
        # An empty payload is complete with its first (empty) chunk: handled by the caller's add().
        return header

    def finish(self) -> None:
        """The stream ended: a half-sent tensor is an error."""
        if self._header is not None:
            raise WireError(
                f"stream ended inside tensor {self._header.name!r} ({self._received} of "
                f"{self._header.payload_nbytes} bytes)"
            )
