"""Quantized base weights: error bounds, exact layouts, edge cases, memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lte.common.core.quant import (
    NF4_LEVELS,
    QUANT_KINDS,
    QuantizedTensor,
    dequantize_int8_rows,
    dequantize_nf4,
    nf4_levels_from_normal,
    quantize,
    quantize_int8_rows,
    quantize_nf4,
    quantized_zeros,
)

MAX_HALF_GAP = float(NF4_LEVELS.diff().max()) / 2
EPS = 1e-6  # relative slack for float32 rounding in quantize/dequantize
# x / scale is rounded in float32 before round-to-nearest: up to 127 ulps of a code, ~8e-6 scale.
INT8_SLACK = 127 * 2.0**-23


def _random_weight(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian values with row scales spread over four orders of magnitude, like real layers."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    if weight.dim() > 0 and weight.shape[0] > 0:
        row_scale = 10 ** (torch.rand(weight.shape[0], generator=gen, dtype=torch.float64) * 4 - 2)
        weight = weight * row_scale.view(-1, *[1] * (weight.dim() - 1))
    return weight.to(dtype)


def _assert_int8_bound(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
    num_rows = scale.numel()
    rows = weight.double().reshape(num_rows, weight.numel() // num_rows if num_rows else 0)
    restored = dequantize_int8_rows(codes, scale, torch.float64).reshape(rows.shape)
    bound = scale.double()[:, None] * (0.5 + INT8_SLACK)
    assert ((rows - restored).abs() <= bound).all()


def _nf4_block_absmax(weight: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each element's block absmax, flattened like the weight."""
    return absmax.double().repeat_interleave(block_size)[: weight.numel()]


def _assert_nf4_bound(
    weight: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, block_size: int
) -> None:
    restored = dequantize_nf4(packed, absmax, tuple(weight.shape), block_size, torch.float64).reshape(-1)
    per_element = _nf4_block_absmax(weight, absmax, block_size)
    bound = per_element * MAX_HALF_GAP * (1 + EPS) + per_element * EPS
    assert ((weight.double().reshape(-1) - restored).abs() <= bound).all()


def _unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel].long()


# --- the NF4 table ---------------------------------------------------------------------------


def test_nf4_levels_are_the_sorted_normal_float_table() -> None:
    assert NF4_LEVELS.dtype == torch.float32 and NF4_LEVELS.shape == (16,)
    assert (NF4_LEVELS.diff() > 0).all()
    assert NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0
    assert (NF4_LEVELS == 0).sum() == 1
    # The published constants are the N(0,1)-quantile construction, to float32 rounding.
    torch.testing.assert_close(NF4_LEVELS, nf4_levels_from_normal(), atol=2e-7, rtol=0)


def test_quant_kinds() -> None:
    assert QUANT_KINDS == ("none", "int8", "nf4")


# --- int8 per row -----------------------------------------------------------------------------


def test_int8_round_trip_within_half_a_step() -> None:
    weight = _random_weight((96, 300))
    codes, scale = quantize_int8_rows(weight)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (96,)
    torch.testing.assert_close(scale, weight.abs().amax(dim=1) / 127)
    _assert_int8_bound(weight, codes, scale)


def test_int8_exact_codes() -> None:
    weight = torch.tensor([[127.0, -127.0, 0.0, 63.4], [1.0, 2.0, -3.0, 0.0]])
    codes, scale = quantize_int8_rows(weight)
    assert scale.tolist() == pytest.approx([1.0, 3 / 127])
    # 1 / (3/127) = 42.33 -> 42, 84.67 -> 85, the row max -> -127 exactly.
    assert codes.tolist() == [[127, -127, 0, 63], [42, 85, -127, 0]]


def test_int8_zero_rows_have_zero_scale_and_no_nan() -> None:
    weight = torch.zeros(4, 8)
    weight[1] = torch.linspace(-1, 1, 8)
    codes, scale = quantize_int8_rows(weight)
    assert scale[0] == 0 and scale[2] == 0 and scale[1] > 0
    restored = dequantize_int8_rows(codes, scale)
    assert torch.isfinite(restored).all()
    assert (restored[[0, 2, 3]] == 0).all()
    q = quantize(torch.zeros(3, 5), "int8")
    assert torch.equal(q.dequantize(), torch.zeros(3, 5))


def test_int8_other_ranks() -> None:
    for shape in [(7,), (4, 3, 5), (), (0, 6), (6, 0)]:
        weight = _random_weight(shape, seed=1)
        q = quantize(weight, "int8")
        assert q.codes.shape == weight.shape
        assert q.scale.shape == ((shape[0],) if shape else (1,))
        assert q.dequantize().shape == weight.shape
        _assert_int8_bound(weight, q.codes, q.scale)


# --- nf4 -------------------------------------------------------------------------------------


def test_nf4_round_trip_within_half_the_largest_gap() -> None:
    weight = _random_weight((96, 300))
    packed, absmax = quantize_nf4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (96 * 300 // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (96 * 300 // 64,)
    _assert_nf4_bound(weight, packed, absmax, 64)


def test_nf4_picks_the_nearest_level() -> None:
    midpoints = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2
    just_above = torch.nextafter(midpoints, torch.tensor(2.0))
    just_below = torch.nextafter(midpoints, torch.tensor(-2.0))
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([just_above, just_below, NF4_LEVELS, torch.rand(4000, generator=gen) * 2 - 1])
    # One block holding 1.0 keeps absmax = 1, so each value is compared with the levels as it is.
    weight = torch.cat([torch.tensor([1.0]), values])
    packed, _ = quantize_nf4(weight, block_size=weight.numel())
    codes = _unpack(packed, weight.numel())[1:]
    expected = (values[:, None] - NF4_LEVELS[None, :]).abs().argmin(dim=1)
    assert torch.equal(codes, expected)
    assert torch.equal(codes[:15], torch.arange(1, 16)) and torch.equal(codes[15:30], torch.arange(15))


def test_nf4_exact_packing_odd_numel_and_partial_block() -> None:
    levels = NF4_LEVELS
    # Block 0 (absmax 2): codes 15, 0, 7, 8. Block 1, partial (absmax 0.5): codes 3, 15, 12.
    weight = torch.cat([2 * levels[[15, 0, 7, 8]], 0.5 * levels[[3, 15, 12]]])
    packed, absmax = quantize_nf4(weight, block_size=4)
    assert absmax.tolist() == [2.0, 0.5]
    # Low nibble = even element, high nibble = odd element; the 7th element's partner nibble is 0.
    assert packed.tolist() == [0x0F, 0x87, 0xF3, 0x0C]
    assert torch.equal(dequantize_nf4(packed, absmax, (7,), block_size=4), weight)


def test_nf4_exact_packing_negative_absmax_and_2d() -> None:
    # The block's largest magnitude is negative: it maps to level 0 (-1.0).
    weight = torch.tensor([[-3.0, 0.0, 3 * 0.5626170039176941], [3.0, 0.0, 0.0]])
    packed, absmax = quantize_nf4(weight, block_size=64)
    assert absmax.tolist() == [3.0]
    assert packed.tolist() == [0x70, 0xFD, 0x77]
    q = QuantizedTensor("nf4", packed, absmax, (2, 3), 64)
    torch.testing.assert_close(q.dequantize(), weight)


def test_nf4_zero_tensor_and_zero_blocks() -> None:
    packed, absmax = quantize_nf4(torch.zeros(130))
    assert absmax.tolist() == [0.0, 0.0, 0.0]
    assert packed.tolist() == [0x77] * 65
    restored = dequantize_nf4(packed, absmax, (130,))
    assert torch.equal(restored, torch.zeros(130))
    weight = torch.zeros(2, 64)
    weight[1] = torch.linspace(-2, 2, 64)
    q = quantize(weight, "nf4")
    assert q.scale.tolist() == [0.0, 2.0]
    assert torch.isfinite(q.dequantize()).all() and (q.dequantize()[0] == 0).all()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("shape", [(3, 5), (7,), (64, 129), (1, 1), (2, 64)])
def test_quantized_zeros_equal_the_quantised_zero_weight(kind: str, shape: tuple[int, ...]) -> None:
    made, reference = quantized_zeros(kind, shape), quantize(torch.zeros(shape), kind)
    assert made.shape == reference.shape and made.kind == reference.kind
    assert made.codes.dtype == reference.codes.dtype and torch.equal(made.codes, reference.codes)
    assert torch.equal(made.scale, reference.scale)
    assert quantized_zeros(kind, shape, device="meta").codes.is_meta  # no storage, as a meta build needs


@pytest.mark.parametrize("kind", ["none", "fp8"])
def test_quantized_zeros_names_the_kinds_it_knows(kind: str) -> None:
    with pytest.raises(ValueError, match=r"unknown quantization kind .*'int8', 'nf4'"):
        quantized_zeros(kind, (4, 4))


def test_nf4_empty_and_scalar() -> None:
    for shape in [(0,), (0, 5), ()]:
        weight = _random_weight(shape, seed=2)
        q = quantize(weight, "nf4")
        assert q.dequantize().shape == weight.shape
        _assert_nf4_bound(weight, q.codes, q.scale, 64)


def test_nf4_dequantize_refuses_mismatched_lengths() -> None:
    packed, absmax = quantize_nf4(torch.randn(10))
    with pytest.raises(ValueError, match=r"needs 6 packed bytes and 1 scales, got 5 and 1"):
        dequantize_nf4(packed, absmax, (12,))


# --- both kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_float64_input_matches_float32_bounds(kind: str) -> None:
    weight = _random_weight((16, 100), seed=4, dtype=torch.float64)
    q = quantize(weight, kind)
    assert q.scale.dtype == torch.float32
    if kind == "int8":
        _assert_int8_bound(weight, q.codes, q.scale)
    else:
        _assert_nf4_bound(weight, q.codes, q.scale, 64)
    # float64 is quantized through float32: the same codes as the float32 copy.
    q32 = quantize(weight.float(), kind)
    assert torch.equal(q.codes, q32.codes) and torch.equal(q.scale, q32.scale)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_dtype(kind: str, dtype: torch.dtype) -> None:
    weight = _random_weight((8, 70), seed=5)
    q = quantize(weight, kind)
    restored = q.dequantize(dtype)
    assert restored.dtype == dtype and restored.shape == weight.shape
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(restored.float(), q.dequantize(), rtol=tolerance, atol=1e-6)


@pytest.mark.parametrize(("kind", "max_ratio"), [("int8", 0.26), ("nf4", 0.1407)])
def test_memory_of_a_vit_b_mlp_weight(kind: str, max_ratio: float) -> None:
    weight = torch.randn(768, 3072)
    q = quantize(weight, kind)
    fp32_bytes = weight.numel() * 4
    # nf4 at block 64 with float32 absmax is 4 + 32/64 = 4.5 bits: 0.140625 of fp32.
    assert q.nbytes / fp32_bytes <= max_ratio
    assert q.nbytes == q.codes.numel() * q.codes.element_size() + q.scale.numel() * 4


def test_quantized_tensor_to_device() -> None:
    q = quantize(torch.randn(4, 6), "nf4", block_size=8)
    moved = q.to("cpu")
    assert moved.kind == "nf4" and moved.block_size == 8 and moved.shape == (4, 6)
    assert torch.equal(moved.dequantize(), q.dequantize())


def test_unknown_kind_is_named() -> None:
    with pytest.raises(ValueError, match="'int4'"):
        quantize(torch.randn(2, 2), "int4")
    with pytest.raises(ValueError, match="'none'"):
        quantize(torch.randn(2, 2), "none")
    with pytest.raises(ValueError, match="'fp8'"):
        QuantizedTensor("fp8", torch.zeros(1), torch.zeros(1), (1,)).dequantize()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_non_finite_weight_is_refused(kind: str) -> None:
    weight = torch.randn(3, 64)
    weight[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(weight, kind)


def test_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(torch.randn(4), block_size=0)


# --- property ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=2000)
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple),
    block_size=st.sampled_from([1, 3, 16, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_bounds_on_random_shapes(shape: tuple[int, ...], block_size: int, seed: int) -> None:
    weight = _random_weight(shape, seed)
    codes, scale = quantize_int8_rows(weight)
    _assert_int8_bound(weight, codes, scale)
    packed, absmax = quantize_nf4(weight, block_size)
    assert packed.numel() == (weight.numel() + 1) // 2
    assert absmax.numel() == -(-weight.numel() // block_size)
    _assert_nf4_bound(weight, packed, absmax, block_size)
