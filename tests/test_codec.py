"""Tensor wire codecs: round trips, exact sizes, zstd, and refusal of every kind of bad input."""

from __future__ import annotations

import dataclasses
import math
import struct
import threading

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lte.common.core.quant import quantize
from lte.common.wire.codec import (
    CODECS,
    CodecError,
    EncodedTensor,
    decode_tensor,
    decode_tensor_quantized,
    encode_tensor,
    get_codec,
    iter_chunks,
    zstd_compress,
    zstd_decompress,
)

SHAPES = [(), (0,), (1,), (7,), (64,), (65,), (3, 0, 5), (5, 13), (2, 3, 33), (96, 130)]


def _tensor(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _with(enc: EncodedTensor, **changes: object) -> EncodedTensor:
    return dataclasses.replace(enc, **changes)


# --- round trips ---------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(CODECS) == {"fp32", "fp16", "bf16", "int8-block", "int8-row", "nf4"}
    for name, codec in CODECS.items():
        assert codec.name == name and get_codec(name) is codec


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_is_exact(shape: tuple[int, ...]) -> None:
    x = _tensor(shape)
    assert torch.equal(decode_tensor(encode_tensor("x", x, "fp32")), x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("codec", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_is_a_cast(shape: tuple[int, ...], codec: str, dtype: torch.dtype) -> None:
    x = _tensor(shape) * 100
    decoded = decode_tensor(encode_tensor("x", x, codec))
    assert decoded.dtype == torch.float32
    # Exactly the value torch rounds to: within half an ulp of the half type.
    assert torch.equal(decoded, x.to(dtype).float())


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_block_within_half_a_step(shape: tuple[int, ...]) -> None:
    numel = math.prod(shape)
    x = _tensor(shape) * torch.logspace(-2, 2, numel).reshape(shape)  # blocks of very different scale
    enc = encode_tensor("x", x, "int8-block", zstd_level=None)
    num_blocks = -(-numel // 64)
    scales = torch.from_numpy(np.frombuffer(enc.payload, "<f4", count=num_blocks).copy())
    flat = x.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, num_blocks * 64 - numel))
    assert torch.equal(scales, padded.abs().view(num_blocks, 64).amax(1) / 127)
    step = scales.repeat_interleave(64)[:numel]
    # Half a step, plus the float32 rounding of x / step (up to 127 ulps of a code).
    assert ((decode_tensor(enc).reshape(-1) - flat).abs() <= step * (0.5 + 1e-5)).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("codec", "kind"), [("int8-row", "int8"), ("nf4", "nf4")])
def test_quant_codecs_carry_quant_py_codes(shape: tuple[int, ...], codec: str, kind: str) -> None:
    x = _tensor(shape)
    enc = encode_tensor("w", x, codec)
    expected = quantize(x, kind)
    got = decode_tensor_quantized(enc)
    assert got.kind == kind and got.shape == tuple(shape) and got.block_size == 64
    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scale, expected.scale)
    assert torch.equal(decode_tensor(enc), expected.dequantize())


def test_nf4_payload_layout_is_scales_then_codes() -> None:
    x = torch.tensor([2.0, -2.0, 0.0])  # one block, absmax 2: codes 15, 0, 7
    payload = get_codec("nf4").encode(x)
    assert payload == struct.pack("<f", 2.0) + bytes([0x0F, 0x07])


def test_int8_row_payload_layout_is_scales_then_codes() -> None:
    x = torch.tensor([[127.0, -63.0], [0.0, 0.0]])
    payload = get_codec("int8-row").encode(x)
    assert payload == struct.pack("<2f", 1.0, 0.0) + np.array([127, -63, 0, 0], np.int8).tobytes()


def test_decode_returns_the_original_dtype() -> None:
    x = _tensor((4, 5)).to(torch.bfloat16)
    assert decode_tensor(encode_tensor("x", x, "fp16")).dtype == torch.bfloat16
    y = _tensor((4, 5)).double()
    decoded = decode_tensor(encode_tensor("y", y, "fp32"))
    assert decoded.dtype == torch.float64 and torch.equal(decoded, y.float().double())


def test_non_contiguous_input() -> None:
    x = _tensor((6, 9)).t()
    for codec in CODECS:
        expected = decode_tensor(encode_tensor("x", x.contiguous(), codec))
        assert torch.equal(decode_tensor(encode_tensor("x", x, codec)), expected)


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("shape", SHAPES)
def test_encoded_nbytes_is_exact(codec: str, shape: tuple[int, ...]) -> None:
    chosen = get_codec(codec)
    assert len(chosen.encode(_tensor(shape))) == chosen.encoded_nbytes(shape)


@pytest.mark.parametrize("codec", list(CODECS))
def test_estimated_ratio_matches_a_large_tensor(codec: str) -> None:
    shape = (768, 3072)
    chosen = get_codec(codec)
    actual = chosen.encoded_nbytes(shape) / (math.prod(shape) * 4)
    assert actual == pytest.approx(chosen.estimated_ratio(), rel=0.01)


# --- zstd -----------------------------------------------------------------------------------------


def test_zstd_round_trip_and_flag() -> None:
    x = _tensor((64, 64)).half().float()  # fp16-exact, so compressed and raw decode alike
    compressed = encode_tensor("x", x, "fp16", zstd_level=3)
    raw = encode_tensor("x", x, "fp16", zstd_level=None)
    assert compressed.compressed and not raw.compressed
    assert compressed.raw_nbytes == raw.raw_nbytes == len(raw.payload) == 64 * 64 * 2
    assert torch.equal(decode_tensor(compressed), decode_tensor(raw))
    data = bytes(range(256)) * 100
    assert zstd_decompress(zstd_compress(data, 1), len(data)) == data
    assert zstd_decompress(zstd_compress(b""), 0) == b""


def test_zstd_compresses_from_many_threads() -> None:
    data = [bytes([i]) * 10_000 + bytes(range(256)) for i in range(8)]
    results: dict[int, bytes] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = zstd_decompress(zstd_compress(data[i], 3), len(data[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(8)] == data


def test_zstd_refuses_a_declared_zip_bomb() -> None:
    bomb = zstd_compress(bytes(50_000_000))  # a few kB declaring 50 MB
    assert len(bomb) < 10_000
    with pytest.raises(CodecError, match="declares 50000000 bytes, more than the limit 1000"):
        zstd_decompress(bomb, 1000)
    enc = EncodedTensor("w", "float32", (250,), "fp32", True, bomb, 1000)
    with pytest.raises(CodecError, match="more than the limit 1000"):
        decode_tensor(enc)


def test_zstd_refuses_an_undeclared_zip_bomb() -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(10_000_000))
    with pytest.raises(CodecError, match="larger than the limit 1000"):
        zstd_decompress(bomb, 1000)
    assert zstd_decompress(bomb, 10_000_000) == bytes(10_000_000)


def test_zstd_refuses_truncated_and_trailing_data() -> None:
    frame = zstd_compress(bytes(range(256)) * 40)
    with pytest.raises(CodecError, match="truncated"):
        zstd_decompress(frame[:-4], 10_240)
    with pytest.raises(CodecError, match="not a zstd frame"):
        zstd_decompress(frame[:3], 10_240)
    with pytest.raises(CodecError, match="not a zstd frame"):
        zstd_decompress(b"definitely not zstd", 10_240)
    with pytest.raises(CodecError, match="unused data"):
        zstd_decompress(frame + b"\x00", 10_240)


def test_truncated_frame_in_a_tensor() -> None:
    enc = encode_tensor("x", _tensor((32, 32)), "fp16")
    with pytest.raises(CodecError, match="zstd"):
        decode_tensor(_with(enc, payload=enc.payload[: len(enc.payload) // 2]))


# --- refusals ---------------------------------------------------------------------------------------


def test_wrong_payload_length() -> None:
    enc = encode_tensor("x", _tensor((4, 4)), "fp32", zstd_level=None)
    with pytest.raises(CodecError, match="must be 64 bytes, got 60"):
        decode_tensor(_with(enc, payload=enc.payload[:-4]))
    with pytest.raises(CodecError, match="must be 64 bytes, got 68"):
        decode_tensor(_with(enc, payload=enc.payload + b"\0" * 4))
    with pytest.raises(CodecError, match="must be 64 bytes, got 60"):
        get_codec("fp32").decode(enc.payload[:-4], (4, 4))
    # The same for a compressed payload whose content is the wrong size.
    short = _with(enc, compressed=True, payload=zstd_compress(enc.payload[:-4]))
    with pytest.raises(CodecError, match="must be 64 bytes, got 60"):
        decode_tensor(short)


def test_raw_nbytes_must_match_the_shape() -> None:
    enc = encode_tensor("x", _tensor((4, 4)), "fp16")
    with pytest.raises(CodecError, match="raw_nbytes says 33, but fp16 of shape \\(4, 4\\) is 32 bytes"):
        decode_tensor(_with(enc, raw_nbytes=33))


def test_unknown_codec_lists_the_valid_ones() -> None:
    with pytest.raises(CodecError, match="unknown codec 'fp8'; valid codecs: fp32, fp16, bf16, int8-block"):
        get_codec("fp8")
    enc = encode_tensor("x", _tensor((2,)), "fp16")
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        decode_tensor(_with(enc, codec="zip"))
    with pytest.raises(CodecError, match="unknown codec"):
        encode_tensor("x", _tensor((2,)), "fp8")


def test_unknown_dtype() -> None:
    enc = encode_tensor("x", _tensor((2,)), "fp16")
    with pytest.raises(CodecError, match="unknown dtype 'int64'"):
        decode_tensor(_with(enc, dtype="int64"))
    with pytest.raises(CodecError, match="cannot encode a int64 tensor"):
        encode_tensor("x", torch.arange(3), "fp16")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((-1, 4), "non-negative, got -1"),
        ((2.0, 4), "must be ints, got float"),
        ((True, 4), "must be ints, got bool"),
        ("4", "must be a tuple of ints"),
        ((0, 2**40, 2**40), "too large"),
        ((1,) * 33, "33 dims"),
    ],
)
def test_bad_shapes(shape: object, message: str) -> None:
    enc = encode_tensor("x", _tensor((4,)), "fp16")
    with pytest.raises(CodecError, match=message):
        decode_tensor(_with(enc, shape=shape))


def test_max_elements() -> None:
    enc = encode_tensor("x", _tensor((10, 10)), "fp16")
    assert decode_tensor(enc, max_elements=100).shape == (10, 10)
    with pytest.raises(CodecError, match="100 elements, more than the limit 99"):
        decode_tensor(enc, max_elements=99)
    # A huge claimed shape is refused on its metadata, before any decompression.
    with pytest.raises(CodecError, match="raw_nbytes"):
        decode_tensor(_with(enc, shape=(2**30, 2**9)))


@pytest.mark.parametrize("codec", ["int8-block", "int8-row", "nf4"])
@pytest.mark.parametrize("bad_scale", [float("nan"), float("inf"), -1.0])
def test_bad_scales_are_refused(codec: str, bad_scale: float) -> None:
    enc = encode_tensor("w", _tensor((3, 64)), codec, zstd_level=None)
    payload = bytearray(enc.payload)
    payload[4:8] = struct.pack("<f", bad_scale)  # the second scale
    with pytest.raises(CodecError, match=f"{codec} payload: scale 1 is"):
        decode_tensor(_with(enc, payload=bytes(payload)))
    if codec != "int8-block":
        with pytest.raises(CodecError, match="scales must be finite and >= 0"):
            decode_tensor_quantized(_with(enc, payload=bytes(payload)))


def test_encoding_non_finite_with_a_quant_codec_is_refused() -> None:
    x = _tensor((2, 64))
    x[0, 0] = float("inf")
    for codec in ["int8-block", "int8-row", "nf4"]:
        with pytest.raises(CodecError, match="NaN or Inf"):
            encode_tensor("x", x, codec)


def test_decode_quantized_needs_a_quant_codec() -> None:
    enc = encode_tensor("x", _tensor((4,)), "fp16")
    with pytest.raises(CodecError, match="no quantized form; expected one of int8-row, nf4"):
        decode_tensor_quantized(enc)


# --- chunks ----------------------------------------------------------------------------------------


def test_iter_chunks() -> None:
    payload = bytes(range(250)) * 41
    chunks = list(iter_chunks(payload, 1000))
    assert [len(c) for c in chunks] == [1000] * 10 + [250]
    assert b"".join(chunks) == payload
    assert all(c.obj is payload for c in chunks)  # views, not copies
    assert [bytes(c) for c in iter_chunks(b"", 1000)] == [b""]
    assert [bytes(c) for c in iter_chunks(b"abcd", 4)] == [b"abcd"]
    with pytest.raises(ValueError, match="chunk_size"):
        list(iter_chunks(b"abc", 0))


# --- fuzz ------------------------------------------------------------------------------------------

_NAMES = [*CODECS, "fp8", ""]
_DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int8", "complex64"]


@st.composite
def _encoded_tensors(draw: st.DrawFn) -> EncodedTensor:
    shape = tuple(draw(st.lists(st.integers(-2, 70), max_size=3)))
    if draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(-(2**63), 2**63), max_size=4)))
    codec = draw(st.sampled_from(_NAMES))
    try:
        expected = get_codec(codec).encoded_nbytes(shape)
    except CodecError:
        expected = draw(st.integers(0, 100))
    # Often exactly the right length, so the bytes reach the codec's own checks.
    length = draw(st.one_of(st.just(expected), st.integers(0, 300))) if 0 <= expected < 5000 else 64
    raw = draw(st.binary(min_size=length, max_size=length))
    compressed = draw(st.booleans())
    payload = raw
    if compressed:
        payload = draw(st.sampled_from([zstd_compress(raw), zstd_compress(raw)[:-3], raw]))
    raw_nbytes = draw(st.one_of(st.just(expected), st.just(len(raw)), st.integers(-5, 10**12)))
    return EncodedTensor(
        name="fuzz",
        dtype=draw(st.sampled_from(_DTYPE_NAMES)),
        shape=shape,
        codec=codec,
        compressed=compressed,
        payload=payload,
        raw_nbytes=raw_nbytes,
    )


@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(enc=_encoded_tensors(), max_elements=st.one_of(st.none(), st.integers(0, 10_000)))
def test_fuzz_decode_raises_only_codec_error(enc: EncodedTensor, max_elements: int | None) -> None:
    for decode in (decode_tensor, decode_tensor_quantized):
        try:
            result = decode(enc, max_elements=max_elements)
        except CodecError:
            continue
        numel = result.numel() if isinstance(result, torch.Tensor) else math.prod(result.shape)
        assert tuple(result.shape) == tuple(enc.shape)
        assert max_elements is None or numel <= max_elements
