"""Tensor wire codecs: how a tensor becomes bytes on the wire and back, never via pickle.

Each codec is a small class behind one interface (`Codec`), registered by name in `CODECS`;
adding a codec touches only this file. `encode_tensor` / `decode_tensor` wrap a codec with the
tensor's metadata and optional zstd, and validate every field before allocating anything.

Payload layouts (all little-endian, no header: shape and codec travel beside the payload):

    fp32        float32[numel]
    fp16        float16[numel]
    bf16        bfloat16[numel] (the upper 16 bits of a float32)
    int8-block  float32 scale[ceil(numel / 64)]  then int8 code[numel]     x ~= code * scale[i // 64]
    int8-row    float32 scale[rows]              then int8 code[numel]     x ~= code * scale[row]
    nf4         float32 absmax[ceil(numel / 64)] then uint8 packed[ceil(numel / 2)]   (see quant.py)

``rows`` is ``shape[0]`` (1 for a 0-d tensor). Elements are in row-major (C) order.
Float bytes are the machine's own, so this module refuses to load on a big-endian host.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from lte.common.core.quant import (
    QuantizedTensor,
    dequantize_int8_rows,
    quantize_int8_rows,
    quantize_nf4,
)

__all__ = [
    "CODECS",
    "Codec",
    "CodecError",
    "DTYPES",
    "EncodedTensor",
    "QuantCodec",
    "apply_byte_delta",
    "byte_delta",
    "check_shape",
    "codec_bytes",
    "decode_tensor",
    "decode_tensor_quantized",
    "encode_tensor",
    "get_codec",
    "iter_chunks",
    "zstd_compress",
    "zstd_decompress",
]

if sys.byteorder != "little":  # float payloads are the host's bytes; every supported host is little-endian
    raise ImportError("lte.common.wire.codec needs a little-endian host")

BLOCK_SIZE = 64
MAX_NDIM = 32
# Bound on the product of the non-zero dims, so even a zero-element shape cannot overflow torch.
MAX_SHAPE_SPAN = 2**40

# The tensor dtypes a payload may say it came from; all codecs carry floating-point values.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class CodecError(ValueError):
    """Bytes or metadata that cannot be a valid encoded tensor (the message says expected vs got)."""


def check_shape(shape: object, max_elements: int | None = None) -> int:
    """Validate a wire shape (a tuple of non-negative ints) and return its element count."""
    if not isinstance(shape, (tuple, list)):
        raise CodecError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise CodecError(f"shape has {len(shape)} dims, at most {MAX_NDIM} allowed")
    for dim in shape:
        # bool is an int subclass; numpy ints are not accepted either: the wire gives Python ints.
        if type(dim) is not int:
            raise CodecError(f"shape {shape!r}: entries must be ints, got {type(dim).__name__}")
        if dim < 0:
            raise CodecError(f"shape {shape!r}: entries must be non-negative, got {dim}")
    if math.prod(max(dim, 1) for dim in shape) > MAX_SHAPE_SPAN:
        raise CodecError(f"shape {tuple(shape)!r} is too large (dims multiply past {MAX_SHAPE_SPAN})")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise CodecError(f"shape {tuple(shape)!r} has {numel} elements, more than the limit {max_elements}")
    return numel


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) > 0 else 1


def _num_blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


def _cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as a contiguous CPU tensor of ``dtype``: one copy at most, none when it already is."""
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def _check_scales(scales: np.ndarray, codec: str) -> None:
    bad = ~np.isfinite(scales) | (scales < 0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise CodecError(
            f"{codec} payload: scale {index} is {float(scales[index])}; scales must be finite and >= 0"
        )


def _read_scales(payload: bytes, count: int, codec: str) -> torch.Tensor:
    """The leading float32 scales of a quant payload, validated, as a fresh tensor."""
    scales = np.frombuffer(payload, dtype="<f4", count=count)
    _check_scales(scales, codec)
    return torch.from_numpy(scales.astype(np.float32))  # astype copies: the tensor owns writable memory


def _read_codes(payload: bytes, offset: int, dtype: type[np.generic]) -> torch.Tensor:
    # copy(): torch must not alias the immutable payload (torch.frombuffer/from_numpy would warn).
    return torch.from_numpy(np.frombuffer(payload, dtype=dtype, offset=offset).copy())


class Codec:
    """One way of turning a tensor into bytes; instances are stateless and shared."""

    name: str = ""

    def encode(self, tensor: torch.Tensor) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        """float32 tensor of ``shape``; CodecError unless ``payload`` has exactly the right length."""
        raise NotImplementedError

    def encoded_nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact length of ``encode()`` output (before zstd) for a tensor of ``shape``."""
        raise NotImplementedError

    def estimated_ratio(self) -> float:
        """Encoded size over float32 size, for a large tensor."""
        raise NotImplementedError

    def _check_payload(self, payload: bytes, shape: tuple[int, ...]) -> None:
        check_shape(shape)
        expected = self.encoded_nbytes(shape)
        if len(payload) != expected:
            raise CodecError(
                f"{self.name} payload for shape {tuple(shape)!r} must be {expected} bytes, got {len(payload)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FloatCodec(Codec):
    """Elements cast to a float type and sent as its little-endian bytes (fp32, fp16, bf16)."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()

    def encode(self, tensor: torch.Tensor) -> bytes:
        # Viewed as bytes so bf16 (which numpy lacks) takes the same path; tobytes is the one copy.
        return _cpu(tensor, self.dtype).reshape(-1).view(torch.uint8).numpy().tobytes()

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        self._check_payload(payload, shape)
        if len(payload) == 0:
            return torch.empty(shape)  # torch.frombuffer refuses an empty buffer
        # One copy into a writable bytearray (frombuffer on immutable bytes warns, and would alias
        # memory torch may not write); the float32 cast is then a no-op for fp32. torch's half
        # casts are ~3x faster than numpy's.
        values = torch.frombuffer(bytearray(payload), dtype=self.dtype)
        return values.to(torch.float32).reshape(shape)

    def encoded_nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) * self.itemsize

    def estimated_ratio(self) -> float:
        return self.itemsize / 4


class Int8BlockCodec(Codec):
    """Blockwise absmax int8 over the flattened tensor (uplink factors): scales, then codes."""

    name = "int8-block"

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = tensor.detach().reshape(-1)
        numel = flat.numel()
        blocks = torch.nn.functional.pad(flat, (0, _num_blocks(numel) * BLOCK_SIZE - numel))
        try:
            # Each block is one "row" of the per-row quantizer; the padding zeros leave absmax alone.
            codes, scales = quantize_int8_rows(blocks.view(-1, BLOCK_SIZE))
        except ValueError as err:
            raise CodecError(f"int8-block cannot encode this tensor: {err}") from None
        # Quantized on the tensor's own device; only the 4x smaller codes move to the CPU.
        code_bytes = codes.reshape(-1)[:numel].cpu().numpy().tobytes()
        return scales.cpu().numpy().astype("<f4", copy=False).tobytes() + code_bytes

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        self._check_payload(payload, shape)
        numel = math.prod(shape)
        num_blocks = _num_blocks(numel)
        scales = _read_scales(payload, num_blocks, self.name)
        codes = _read_codes(payload, 4 * num_blocks, np.int8)
        blocks = torch.nn.functional.pad(codes, (0, num_blocks * BLOCK_SIZE - numel)).view(-1, BLOCK_SIZE)
        return dequantize_int8_rows(blocks, scales).reshape(-1)[:numel].reshape(shape)

    def encoded_nbytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return 4 * _num_blocks(numel) + numel

    def estimated_ratio(self) -> float:
        return (BLOCK_SIZE + 4) / (4 * BLOCK_SIZE)


class QuantCodec(Codec):
    """A codec for a quant.py kind; a worker may keep the codes via `decode_quantized`."""

    kind: str = ""

    def encode(self, tensor: torch.Tensor) -> bytes:
        try:
            quantized = self.quantize(tensor.detach())  # on its own device: only codes move
        except ValueError as err:
            raise CodecError(f"{self.name} cannot encode this tensor: {err}") from None
        return self.encode_quantized(quantized)

    def decode(self, payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        return self.decode_quantized(payload, shape).dequantize(torch.float32)

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError

    def encode_quantized(self, quantized: QuantizedTensor) -> bytes:
        """Layout: float32 scales, then the codes, as held by ``quantized``."""
        if quantized.kind != self.kind:
            raise CodecError(f"{self.name} encodes kind {self.kind!r}, got {quantized.kind!r}")
        scales = quantized.scale.detach().cpu().to(torch.float32).numpy().astype("<f4", copy=False)
        return scales.tobytes() + quantized.codes.detach().cpu().contiguous().numpy().tobytes()

    def decode_quantized(self, payload: bytes, shape: tuple[int, ...]) -> QuantizedTensor:
        raise NotImplementedError


class Int8RowCodec(QuantCodec):
    """Per-output-row int8 (snapshots): float32 scale[rows], then int8 codes[numel]."""

    name = "int8-row"
    kind = "int8"

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        codes, scale = quantize_int8_rows(tensor)
        return QuantizedTensor("int8", codes, scale, tuple(tensor.shape))

    def decode_quantized(self, payload: bytes, shape: tuple[int, ...]) -> QuantizedTensor:
        self._check_payload(payload, shape)
        rows = _rows(shape)
        scale = _read_scales(payload, rows, self.name)
        codes = _read_codes(payload, 4 * rows, np.int8).reshape(shape)
        return QuantizedTensor("int8", codes, scale, tuple(shape))

    def encoded_nbytes(self, shape: tuple[int, ...]) -> int:
        return 4 * _rows(shape) + math.prod(shape)

    def estimated_ratio(self) -> float:
        return 0.25  # plus 4 bytes per row: under 0.3 % for a 768-wide row


class Nf4Codec(QuantCodec):
    """NF4, block 64 (snapshots): float32 absmax[blocks], then uint8 packed[ceil(numel / 2)]."""

    name = "nf4"
    kind = "nf4"

    def quantize(self, tensor: torch.Tensor) -> QuantizedTensor:
        packed, absmax = quantize_nf4(tensor, BLOCK_SIZE)
        return QuantizedTensor("nf4", packed, absmax, tuple(tensor.shape), BLOCK_SIZE)

    def encode_quantized(self, quantized: QuantizedTensor) -> bytes:
        if quantized.block_size != BLOCK_SIZE:
            raise CodecError(f"nf4 codec carries block size {BLOCK_SIZE}, got {quantized.block_size}")
        return super().encode_quantized(quantized)

    def decode_quantized(self, payload: bytes, shape: tuple[int, ...]) -> QuantizedTensor:
        self._check_payload(payload, shape)
        num_blocks = _num_blocks(math.prod(shape))
        absmax = _read_scales(payload, num_blocks, self.name)
        packed = _read_codes(payload, 4 * num_blocks, np.uint8)
        return QuantizedTensor("nf4", packed, absmax, tuple(shape), BLOCK_SIZE)

    def encoded_nbytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return 4 * _num_blocks(numel) + (numel + 1) // 2

    def estimated_ratio(self) -> float:
        return (BLOCK_SIZE / 2 + 4) / (4 * BLOCK_SIZE)


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        FloatCodec("fp32", torch.float32),
        FloatCodec("fp16", torch.float16),
        FloatCodec("bf16", torch.bfloat16),
        Int8BlockCodec(),
        Int8RowCodec(),
        Nf4Codec(),
    )
}


def get_codec(name: str) -> Codec:
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise CodecError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")
    return codec


# zstd contexts are not thread-safe, so each thread keeps its own: creating one per call measured
# ~5 us extra per call (30 % of a 1 kB chunk's compress), reuse costs nothing.
_zstd_contexts = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    by_level = getattr(_zstd_contexts, "compressors", None)
    if by_level is None:
        by_level = _zstd_contexts.compressors = {}
    if level not in by_level:
        by_level[level] = zstandard.ZstdCompressor(level=level)  # writes the content size in the frame
    return by_level[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_zstd_contexts, "decompressor", None)
    if dctx is None:
        dctx = _zstd_contexts.decompressor = zstandard.ZstdDecompressor()
    return dctx


def zstd_compress(data: bytes, level: int = 3) -> bytes:
    """One zstd frame holding ``data``, with its content size declared in the header."""
    if not isinstance(level, int) or not -(2**17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(f"zstd level must be an int <= {zstandard.MAX_COMPRESSION_LEVEL}, got {level!r}")
    return _compressor(level).compress(data)


def zstd_decompress(data: bytes, max_output_size: int) -> bytes:
    """Decompress one zstd frame; CodecError if it is corrupt, truncated, or would exceed the limit."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise CodecError(f"not a zstd frame: bad or truncated header ({len(data)} bytes)") from None
    # zstandard allocates the declared size up front, so refuse a large declaration before decompressing.
    if declared > max_output_size:
        raise CodecError(f"zstd frame declares {declared} bytes, more than the limit {max_output_size}")
    if declared == -1 and max_output_size == 0:
        raise CodecError("zstd frame without a declared size cannot be checked against a limit of 0 bytes")
    try:
        # With no declared size the output buffer is max_output_size bytes: a bomb fails as "full".
        return _decompressor().decompress(data, max_output_size=max_output_size, allow_extra_data=False)
    except zstandard.ZstdError as err:
        raise CodecError(
            f"zstd frame is corrupt, truncated or larger than the limit {max_output_size}: {err}"
        ) from None


def iter_chunks(payload: bytes, chunk_size: int) -> Iterator[memoryview]:
    """Zero-copy views of ``payload`` of at most ``chunk_size`` bytes; one empty chunk if it is empty."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    view = memoryview(payload).cast("B")
    if len(view) == 0:
        yield view
        return
    for start in range(0, len(view), chunk_size):
        yield view[start : start + chunk_size]


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as it travels: metadata + codec output (zstd-compressed when ``compressed``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    codec: str
    compressed: bool
    payload: bytes
    raw_nbytes: int
    # The payload is a byte delta (``byte_delta``) against the receiver's codec bytes of the same
    # tensor at an earlier version, not the codec bytes themselves (delta-coded snapshots).
    delta: bool = False
    crc32: int = 0  # a delta's check: zlib.crc32 of the codec bytes it yields


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CodecError(f"cannot encode a {name} tensor; supported dtypes: {', '.join(DTYPES)}")
    return name


def encode_tensor(
    name: str, tensor: torch.Tensor, codec: str = "fp16", zstd_level: int | None = 3
) -> EncodedTensor:
    """Encode ``tensor`` with ``codec``; zstd-compress exactly when ``zstd_level`` is not None."""
    dtype = _dtype_name(tensor.dtype)
    chosen = get_codec(codec)
    raw = chosen.encode(tensor)
    payload = raw if zstd_level is None else zstd_compress(raw, zstd_level)
    return EncodedTensor(
        name=name,
        dtype=dtype,
        shape=tuple(tensor.shape),
        codec=chosen.name,
        compressed=zstd_level is not None,
        payload=payload,
        raw_nbytes=len(raw),
    )


def byte_delta(new: bytes, base: bytes) -> bytes:
    """``new - base`` bytewise modulo 256, the delta that ``apply_byte_delta(base, ·)`` turns back
    into ``new`` exactly. Between consecutive snapshots most int8 codes are equal or one apart, so
    the delta is mostly 0, 1 and 255, which zstd compresses far better than the codes. ValueError
    unless both have the same length."""
    if len(new) != len(base):
        raise ValueError(f"a byte delta needs equal lengths, got {len(new)} and {len(base)}")
    diff = np.frombuffer(new, dtype=np.uint8) - np.frombuffer(base, dtype=np.uint8)  # wraps modulo 256
    return diff.tobytes()


def apply_byte_delta(base: bytes, delta: bytes) -> bytes:
    """``base + delta`` bytewise modulo 256 (inverse of ``byte_delta``); CodecError on a length mismatch."""
    if len(base) != len(delta):
        raise CodecError(f"a byte delta of {len(delta)} bytes cannot apply to {len(base)} bytes")
    return (np.frombuffer(base, dtype=np.uint8) + np.frombuffer(delta, dtype=np.uint8)).tobytes()


def codec_bytes(enc: EncodedTensor, *, max_elements: int | None = None) -> bytes:
    """``enc``'s codec output (decompressed and length-checked), or its delta's bytes when
    ``enc.delta``: the caller adds those to its base with ``apply_byte_delta``. CodecError when invalid."""
    return _raw_payload(enc, max_elements, allow_delta=True)[1]


def _raw_payload(
    enc: EncodedTensor, max_elements: int | None, allow_delta: bool = False
) -> tuple[Codec, bytes]:
    """Validate ``enc``'s metadata, then return its codec and its decompressed, length-checked payload."""
    if enc.delta and not allow_delta:
        raise CodecError(f"{enc.name!r} is a delta: add it to its base (apply_byte_delta) before decoding")
    check_shape(enc.shape, max_elements)
    codec = get_codec(enc.codec)
    if enc.dtype not in DTYPES:
        raise CodecError(f"unknown dtype {enc.dtype!r}; supported dtypes: {', '.join(DTYPES)}")
    if not isinstance(enc.payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(enc.payload).__name__}")
    expected = codec.encoded_nbytes(tuple(enc.shape))
    if enc.raw_nbytes != expected:
        raise CodecError(
            f"{enc.name!r}: raw_nbytes says {enc.raw_nbytes!r}, but {enc.codec} of shape "
            f"{tuple(enc.shape)!r} is {expected} bytes"
        )
    raw = zstd_decompress(enc.payload, expected) if enc.compressed else enc.payload
    if len(raw) != expected:
        raise CodecError(
            f"{enc.name!r}: {enc.codec} payload of shape {tuple(enc.shape)!r} must be {expected} bytes, "
            f"got {len(raw)}"
        )
    return codec, raw


def decode_tensor(enc: EncodedTensor, *, max_elements: int | None = None) -> torch.Tensor:
    """The tensor ``enc`` carries, in its original dtype; CodecError for anything invalid."""
    codec, raw = _raw_payload(enc, max_elements)
    return codec.decode(raw, tuple(enc.shape)).to(DTYPES[enc.dtype])


def decode_tensor_quantized(enc: EncodedTensor, *, max_elements: int | None = None) -> QuantizedTensor:
    """The codes and scales ``enc`` carries, not dequantized (for "int8-row" and "nf4")."""
    codec, raw = _raw_payload(enc, max_elements)
    if not isinstance(codec, QuantCodec):
        quant = [name for name, c in CODECS.items() if isinstance(c, QuantCodec)]
        raise CodecError(f"codec {enc.codec!r} has no quantized form; expected one of {', '.join(quant)}")
    return codec.decode_quantized(raw, tuple(enc.shape))
