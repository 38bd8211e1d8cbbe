"""Quantized base weights: int8 per output row and 4-bit NormalFloat (NF4) blockwise.

A worker holds the frozen base weight ``W`` only as ``q(W)`` and dequantizes it on every
forward of an LTE layer, so dequantization is a handful of vectorised tensor ops with no
Python loop over elements or blocks. Plain PyTorch: the same code runs on CPU and CUDA.

Layouts
-------
int8:  ``codes`` int8 with the weight's shape; ``scale`` float32 ``[rows]`` where rows is
       dim 0 (the output features of an ``nn.Linear``) and ``scale = absmax(row) / 127``.
       ``w ~= codes * scale[:, None]``.
nf4:   the weight is flattened row-major and cut into blocks of ``block_size`` (the last one
       may be partial); ``absmax`` float32 ``[num_blocks]``; each element's 4-bit code is the
       index of the nearest ``NF4_LEVELS`` entry to ``x / absmax``. Codes are packed two per
       byte, low nibble = even element, high nibble = odd element, ``ceil(numel / 2)`` bytes.
       ``w ~= NF4_LEVELS[code] * absmax[block]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "NF4_LEVELS",
    "QUANT_KINDS",
    "QuantizedTensor",
    "dequantize_int8_rows",
    "dequantize_nf4",
    "nf4_levels_from_normal",
    "quantize",
    "quantize_int8_rows",
    "quantize_nf4",
]

QUANT_KINDS = ("none", "int8", "nf4")

# The 16 NF4 levels published with QLoRA (Dettmers et al. 2023), kept verbatim so codes are
# interchangeable with bitsandbytes; `nf4_levels_from_normal` rebuilds them from their definition.
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Decision boundaries halfway between adjacent levels: x's nearest level is the count of those below it.
_NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2

# Nearest-level search through a uniform grid on [-1, 1]: a cell's code is looked up, then corrected
# by one comparison (cells are far narrower than any gap between midpoints). 3x faster than bucketize.
_GRID_CELLS = 1024

_INT8_MAX = 127


def nf4_levels_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 levels from their definition: N(0,1) quantiles, 8 positive + 7 negative + an exact 0.

    ``offset`` is QLoRA's choice, ``(1 - 1/(2*15) + 1 - 1/(2*16)) / 2``: the outermost
    quantile, so the levels fill [-1, 1] after normalising by the largest magnitude.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).to(torch.float32)


# Per-(device, dtype) copies of small constant tables, so a CUDA forward never re-uploads them.
_table_cache: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}


def _cached(name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (torch.device(device), dtype, name)
    table = _table_cache.get(key)
    if table is None:
        table = _build_table(name).to(device=device, dtype=dtype)
        _table_cache[key] = table
    return table


def _build_table(name: str) -> torch.Tensor:
    if name == "byte_pairs":
        # Row b holds the two values a packed byte b stands for: one gather unpacks both nibbles.
        byte = torch.arange(256)
        return torch.stack([NF4_LEVELS[byte & 0x0F], NF4_LEVELS[byte >> 4]], dim=1)
    grid_left_edges = torch.arange(_GRID_CELLS + 1) / (_GRID_CELLS / 2) - 1
    grid_codes = torch.bucketize(grid_left_edges, _NF4_MIDPOINTS)
    if name == "grid_codes":
        return grid_codes.to(torch.uint8)
    if name == "grid_next_midpoint":
        # The first midpoint at or above each cell's left edge; 2 past the last level (never crossed).
        return torch.cat([_NF4_MIDPOINTS, torch.tensor([2.0])])[grid_codes]
    raise KeyError(name)


def _nearest_nf4_codes(normalised: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest NF4 level for each value of a 1-d float32 tensor in [-1, 1]."""
    device = normalised.device
    cell = torch.add(normalised, 1).mul_(_GRID_CELLS / 2).to(torch.int32)
    codes = _cached("grid_codes", device, torch.uint8).index_select(0, cell)
    next_midpoint = _cached("grid_next_midpoint", device, torch.float32).index_select(0, cell)
    return codes.add_(normalised > next_midpoint)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View ``tensor`` as [rows, cols] with rows = dim 0 (1 row for a 0-d tensor)."""
    rows = tensor.shape[0] if tensor.dim() > 0 else 1
    cols = tensor.numel() // rows if rows > 0 else 0
    return tensor.reshape(rows, cols)


def _check_finite_scale(scale: torch.Tensor) -> None:
    # Scales are tiny next to the weight, so this is the cheap place to catch NaN/Inf weights.
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("cannot quantize a weight with NaN or Inf values")


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per output row (dim 0), round to nearest.

    Returns ``(codes, scale)``: int8 codes with ``weight``'s shape and float32 ``scale[rows]``.
    An all-zero row gets scale 0 and codes 0.
    """
    rows = _as_rows(weight.detach()).to(torch.float32)
    absmax = rows.abs().amax(dim=1) if rows.shape[1] > 0 else rows.new_zeros(rows.shape[0])
    scale = absmax / _INT8_MAX
    _check_finite_scale(scale)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: 0 / 1 = 0, no NaN
    codes = torch.round(rows / divisor[:, None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return codes.reshape(weight.shape), scale


def dequantize_int8_rows(
    codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes * scale[:, None]`` in ``dtype``, with ``codes``' shape."""
    rows = _as_rows(codes).to(dtype, copy=True)  # a fresh tensor, so scaling it in place is safe
    return rows.mul_(scale.to(dtype)[:, None]).reshape(codes.shape)


def _num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def _pad_to(flat: torch.Tensor, length: int) -> torch.Tensor:
    """``flat`` zero-padded or trimmed to ``length``; itself (no copy) when already that long."""
    if flat.numel() == length:
        return flat
    if flat.numel() > length:
        return flat[:length]
    return torch.nn.functional.pad(flat, (0, length - flat.numel()))


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 blockwise quantization of the row-major flattened ``weight``.

    Returns ``(packed, absmax)``: uint8 ``[ceil(numel / 2)]`` (low nibble = even element) and
    float32 ``[ceil(numel / block_size)]``. An all-zero block gets absmax 0 and code 7 (level 0).
    """
    _check_block_size(block_size)
    flat = weight.detach().reshape(-1).to(torch.float32)
    numel = flat.numel()
    num_blocks = _num_blocks(numel, block_size)
    blocks = _pad_to(flat, num_blocks * block_size).view(num_blocks, block_size)
    absmax = blocks.abs().amax(dim=1) if num_blocks > 0 else flat.new_zeros(0)
    _check_finite_scale(absmax)
    divisor = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normalised = (blocks / divisor[:, None]).view(-1)[:numel]
    codes = _nearest_nf4_codes(normalised)
    if numel % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))  # the odd tail's high nibble is 0
    pairs = codes.view(-1, 2)
    packed = pairs[:, 0] | (pairs[:, 1] << 4)
    return packed, absmax


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    block_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize_nf4`: ``NF4_LEVELS[code] * absmax[block]`` with ``shape``, in ``dtype``."""
    _check_block_size(block_size)
    numel = math.prod(shape)
    num_blocks = _num_blocks(numel, block_size)
    if packed.numel() != (numel + 1) // 2 or absmax.numel() != num_blocks:
        raise ValueError(
            f"nf4 of shape {tuple(shape)} needs {(numel + 1) // 2} packed bytes and {num_blocks} scales, "
            f"got {packed.numel()} and {absmax.numel()}"
        )
    byte_pairs = _cached("byte_pairs", packed.device, dtype)
    values = byte_pairs.index_select(0, packed.to(torch.int32)).view(-1)  # level of each element
    # Whole blocks (zero-padded, or the odd tail trimmed) so absmax broadcasts over [blocks, block].
    blocks = _pad_to(values, num_blocks * block_size).view(num_blocks, block_size)
    blocks.mul_(absmax.to(dtype)[:, None])
    return blocks.view(-1)[:numel].view(shape)


@dataclass
class QuantizedTensor:
    """A quantized weight: codes + float32 scales + the original shape (see module docstring)."""

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    block_size: int = 64

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind == "int8":
            return dequantize_int8_rows(self.codes, self.scale, dtype).reshape(self.shape)
        if self.kind == "nf4":
            return dequantize_nf4(self.codes, self.scale, self.shape, self.block_size, dtype)
        raise ValueError(f"unknown quantized kind {self.kind!r}; expected 'int8' or 'nf4'")

    @property
    def nbytes(self) -> int:
        """Bytes held: codes + scales (what a worker keeps instead of the fp32 weight)."""
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(
            self.kind, self.codes.to(device), self.scale.to(device), self.shape, self.block_size
        )


def quantized_zeros(
    kind: str, shape: Sequence[int], device: torch.device | str | None = None, block_size: int = 64
) -> QuantizedTensor:
    """The quantised form of an all-zero weight of ``shape``, built without a float copy of it."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if kind == "int8":
        rows = shape[0] if shape else 1
        return QuantizedTensor(
            "int8",
            torch.zeros(shape, dtype=torch.int8, device=device),
            torch.zeros(rows, dtype=torch.float32, device=device),
            shape,
        )
    if kind == "nf4":
        _check_block_size(block_size)
        zero_pair = 7 | (7 << 4)  # code 7 is level 0 in both nibbles; an odd tail's high nibble is 0
        packed = torch.full(((numel + 1) // 2,), zero_pair, dtype=torch.uint8, device=device)
        if numel % 2:
            packed[-1:] = 7
        absmax = torch.zeros(_num_blocks(numel, block_size), dtype=torch.float32, device=device)
        return QuantizedTensor("nf4", packed, absmax, shape, block_size)
    raise ValueError(f"unknown quantization kind {kind!r}; expected one of 'int8', 'nf4'")


def quantize(weight: torch.Tensor, kind: str, block_size: int = 64) -> QuantizedTensor:
    """Quantize ``weight`` as ``kind`` ("int8" or "nf4"); the "none" kind has no quantized form."""
    shape = tuple(weight.shape)
    if kind == "int8":
        codes, scale = quantize_int8_rows(weight)
        return QuantizedTensor("int8", codes, scale, shape)
    if kind == "nf4":
        packed, absmax = quantize_nf4(weight, block_size)
        return QuantizedTensor("nf4", packed, absmax, shape, block_size)
    if kind == "none":
        raise ValueError("quantization kind 'none' keeps the weight as it is; there is nothing to quantize")
    raise ValueError(f"unknown quantization kind {kind!r}; expected one of 'int8', 'nf4'")
