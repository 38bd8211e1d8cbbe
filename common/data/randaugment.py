"""RandAugment (Cubuk et al. 2020, arXiv 1909.13719) on 8-bit PIL images, drawn from a seeded generator.

Each training image gets ``num_ops`` operations, each drawn uniformly (with replacement) from the 14
below and applied in turn at one shared magnitude M, on torchvision's scale of 31 bins (0..30; the
usual setting is ``torchvision.transforms.RandAugment(num_ops=2, magnitude=9)``). The value of bin M
of each op, and the random sign of the signed ones, are those of torchvision's
``RandAugment._augmentation_space`` (t = M / 30; W, H the image's width and height in pixels):

  op             value at bin M                     Pillow call (what torchvision runs on a PIL image)
  identity       -                                   none
  shear-x/y      +-0.3 t, shear factor               Image.transform(AFFINE, (1, s, 0, 0, 1, 0) / (1, 0, 0, s, 1, 0))
  translate-x/y  +-(150/331) t W (H), whole pixels   Image.transform(AFFINE, shift), truncated toward 0
  rotate         +-30 t degrees, counter-clockwise   Image.rotate about the centre
  brightness     factor 1 +- 0.9 t                   ImageEnhance.Brightness
  color          factor 1 +- 0.9 t                   ImageEnhance.Color (saturation; none on grayscale)
  contrast       factor 1 +- 0.9 t                   ImageEnhance.Contrast
  sharpness      factor 1 +- 0.9 t                   ImageEnhance.Sharpness
  posterize      keep 8 - round(M / 7.5) bits        ImageOps.posterize
  solarize       threshold 255 (1 - t)               ImageOps.solarize (pixels >= threshold inverted)
  autocontrast   -                                   ImageOps.autocontrast
  equalize       -                                   ImageOps.equalize

Geometric ops sample nearest-neighbour and fill what they uncover with 0 (torchvision's defaults).
The shear's sign convention may be the mirror of torchvision's (it is drawn +- with probability 1/2
either way, so the distribution is the same).

Why Pillow: the images are already 8-bit PIL images in the loader processes at this point (after the
crop and flip, as in torchvision's training pipeline), so RandAugment costs no conversion and adds no
dependency. PyPI's torchvision does not import beside the pinned CPU torch here; kornia 0.9.0 does,
but its ``RandAugment`` draws from torch's global RNG and its functional ops work on float tensors,
which would have to be un-normalised on the training device. The draws here come from the
per-sample generator that ``ImageFiles`` seeds from (seed, head, step, position), so an augmented
batch is the same in ``lte-sim``, on any worker and in any loader process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

RANDAUGMENT_OPS = (
    "identity",
    "shear-x",
    "shear-y",
    "translate-x",
    "translate-y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
MAX_MAGNITUDE = 30  # torchvision's num_magnitude_bins=31: magnitudes 0..30
DEFAULT_MAGNITUDE = 9  # torchvision's default, and the paper's ImageNet ResNet-50 setting (N=2, M=9)
_SIGNED = frozenset(RANDAUGMENT_OPS[1:10])  # shear .. sharpness: drawn +- with probability 1/2
_ENHANCERS = {"brightness": "Brightness", "color": "Color", "contrast": "Contrast", "sharpness": "Sharpness"}


@dataclass(frozen=True)
class Op:
    """One drawn operation: its name and its signed value (see the module's table for units)."""

    name: str
    value: float


def op_value(name: str, magnitude: int, width: int, height: int) -> float:
    """The unsigned value of op ``name`` at bin ``magnitude`` (0..30) for a ``width`` x ``height``
    image: shear factor, pixels, degrees, enhancement offset, bits kept or threshold (module table).

    Raises ValueError for an unknown op or a magnitude outside 0..30.
    """
    if name not in RANDAUGMENT_OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(RANDAUGMENT_OPS)}")
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"RandAugment magnitude must be in [0, {MAX_MAGNITUDE}], got {magnitude}")
    t = magnitude / MAX_MAGNITUDE
    if name in ("shear-x", "shear-y"):
        return 0.3 * t
    if name == "translate-x":
        return 150.0 / 331.0 * width * t
    if name == "translate-y":
        return 150.0 / 331.0 * height * t
    if name == "rotate":
        return 30.0 * t
    if name in _ENHANCERS:
        return 0.9 * t
    if name == "posterize":
        return float(8 - round(magnitude / (MAX_MAGNITUDE / 4)))
    if name == "solarize":
        return 255.0 * (1.0 - t)
    return 0.0  # identity, autocontrast, equalize


def draw_ops(num_ops: int, magnitude: int, width: int, height: int, rng: np.random.Generator) -> list[Op]:
    """``num_ops`` ops drawn uniformly with replacement, each with its sign (+- with probability 1/2
    for the signed ones). Two draws from ``rng`` per op (the op, then the sign, drawn for every op so
    that the stream's layout does not depend on which ops came up)."""
    ops = []
    for _ in range(num_ops):
        name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
        negative = bool(rng.random() < 0.5)
        value = op_value(name, magnitude, width, height)
        ops.append(Op(name, -value if negative and name in _SIGNED else value))
    return ops


def apply_op(im: Any, op: Op) -> Any:
    """``im`` (PIL, mode L or RGB) with ``op`` applied: an image of the same size and mode (``im``
    itself for identity; Pillow's ops never change their input)."""
    from PIL import Image, ImageEnhance, ImageOps

    name, v = op.name, op.value
    fill = 0 if im.mode == "L" else (0, 0, 0)
    nearest = Image.Resampling.NEAREST
    if name == "identity":
        return im
    if name in ("shear-x", "shear-y", "translate-x", "translate-y"):
        if name == "shear-x":
            data = (1.0, v, 0.0, 0.0, 1.0, 0.0)  # output (x, y) samples input (x + v y, y)
        elif name == "shear-y":
            data = (1.0, 0.0, 0.0, v, 1.0, 0.0)
        elif name == "translate-x":
            data = (1.0, 0.0, -float(int(v)), 0.0, 1.0, 0.0)  # content moves right by int(v) pixels
        else:
            data = (1.0, 0.0, 0.0, 0.0, 1.0, -float(int(v)))
        return im.transform(im.size, Image.Transform.AFFINE, data, resample=nearest, fillcolor=fill)
    if name == "rotate":
        return im.rotate(v, resample=nearest, fillcolor=fill)
    if name in _ENHANCERS:
        return getattr(ImageEnhance, _ENHANCERS[name])(im).enhance(1.0 + v)
    if name == "posterize":
        return ImageOps.posterize(im, int(v))
    if name == "solarize":
        return ImageOps.solarize(im, math.ceil(v))  # pixel i is inverted iff i >= v iff i >= ceil(v)
    if name == "autocontrast":
        return ImageOps.autocontrast(im)
    return ImageOps.equalize(im)


def rand_augment(im: Any, num_ops: int, magnitude: int, rng: np.random.Generator) -> Any:
    """``im`` (PIL, L or RGB, any size) after ``num_ops`` ops at ``magnitude`` drawn from ``rng``
    (``draw_ops``): same size and mode. ``num_ops`` 0 returns ``im`` itself and draws nothing."""
    for op in draw_ops(num_ops, magnitude, im.width, im.height, rng):
        im = apply_op(im, op)
    return im
