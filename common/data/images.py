"""Image folders read from disk as they are used, with the standard ViT augmentations.

Nothing here holds decoded pixels beyond one batch: an ``ImageFiles`` is a list of paths and
labels, and ``x[idx]`` decodes those files (in the caller's process, or in a DataLoader worker
process, see ``common/data/loader.py``). A training sample's augmentation is drawn from a generator
seeded by the caller (``common/data/datasets.py`` seeds it from (seed, head, step, position)), so a batch is
a pure function of its indices and seeds, in any process.

Decoding (Pillow, already a dependency) brings every PIL mode to 8-bit L or RGB: 16-bit and
32-bit integer images are scaled by their bit depth (not clipped), palette and alpha images are
converted as torchvision's ImageFolder loader does (``convert("RGB")``), CMYK JPEGs too.

Augmentations (Pillow crop-and-resize in one call, on uint8, in the loader processes):
  train: random resized crop (scale 0.08-1, ratio 3/4-4/3, torchvision's 10-try algorithm,
         ``torchvision.transforms.RandomResizedCrop``) to ``image_size``, then a horizontal flip
         with probability 1/2;
  eval:  resize the shorter side to ``image_size`` and take the centre square.
  RandAugment (``randaugment=(N, M)``, ``common/data/randaugment.py``): after the crop and flip, N ops at
         magnitude M, drawn from the same per-sample generator (so the crop does not change with it).
Kornia was the other candidate; it works on float tensors of the full decoded image, and the
crop happens better before the float conversion, where Pillow does it in one pass.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lte.common.data.randaugment import MAX_MAGNITUDE, rand_augment
from lte.common.data.seeds import generator

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUGMENTS = ("none", "crop-flip")

_log = logging.getLogger("lte.data")


class BadImageError(ValueError):
    """A file that Pillow cannot decode (damaged, truncated, or not an image). Names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(
            f"damaged image {path}: {reason}; remove or replace it, or pass --skip-bad-images to skip such files"
        )


def is_hidden(name: str) -> bool:
    """Names that tools leave behind, never classes or samples: .DS_Store, .ipynb_checkpoints, __MACOSX."""
    return name.startswith(".") or name.startswith("__")


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Every visible sub-folder of ``root`` (a class, even if empty) and its image files, sorted by name.

    Hidden folders and files (``is_hidden``) and files without an image extension are ignored.
    """
    classes: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)):
        classes[d.name] = sorted(
            f
            for f in d.iterdir()
            if f.is_file() and not is_hidden(f.name) and f.suffix.lower() in IMAGE_EXTENSIONS
        )
    return classes


def decode_image(path: str | Path, channels: int, data: bytes | None = None) -> Any:
    """Open ``path`` (or ``data``, the bytes of the sample named ``path``) as an 8-bit PIL image of
    mode ``L`` (channels 1) or ``RGB`` (channels 3).

    Raises BadImageError naming the file when Pillow cannot decode all of it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            im.load()  # decode now: a truncated file fails here, not later in a resize
            im = _to_8bit(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # Pillow asks for this order for palette images with transparency
            return im.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError as e:
        raise BadImageError(path, "not an image file Pillow can identify") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(path, str(e) or type(e).__name__) from e


def _to_8bit(im):
    """16/32-bit integer and float images scaled to 0..255 by their bit depth (not clipped)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        # "I;16*" is 16-bit by definition; Pillow also opens 16-bit PNGs as "I"
        full = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        full = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.clip(np.rint(a * (255.0 / full)), 0, 255).astype(np.uint8), "L")
    return im


def read_member(paths: Sequence[str], member: np.ndarray) -> bytes:
    """The bytes of one indexed sample's image: one seek and one read."""
    shard, offset, size = (int(v) for v in member)
    with open(paths[shard], "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{paths[shard]} ends inside a member ({len(data)} of {size} bytes at offset {offset})")
    return data


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square (left, top, right, bottom): resize it to get resize + centre-crop."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def random_resized_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): area fraction ~ U(scale),
    log aspect ~ U(log ratio), 10 tries, then the centre crop with the ratio clamped."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def image_tensor(
    path: str | Path,
    image_size: int,
    channels: int,
    augment: str = "none",
    seed: int | None = None,
    data: bytes | None = None,
    randaugment: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """One file (or ``data``, see decode_image) as a uint8 tensor [C, image_size, image_size]: eval
    view, or augmented from ``seed`` (``augment``, then RandAugment's ``(num_ops, magnitude)``; 0 ops:
    none). Without a seed, neither applies."""
    from PIL import Image

    im = decode_image(path, channels, data)
    rng = np.random.default_rng(seed) if seed is not None else None
    if augment == "crop-flip" and rng is not None:
        box = random_resized_box(im.width, im.height, rng)
        flip = bool(rng.random() < 0.5)
    else:
        box, flip = centre_box(im.width, im.height), False
    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if randaugment[0] and rng is not None:
        im = rand_augment(im, randaugment[0], randaugment[1], rng)
    a = np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, channels)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


class ImageFiles:
    """Images on disk, decoded on indexing: ``x[i]``, ``x[a:b]``, ``x[tensor]`` give float32
    [.., C, S, S] tensors normalised with ``mean`` and ``std`` (per channel, of pixels / 255), eval view.

    ``load(indices, seeds)`` gives the training view: sample k augmented from ``seeds[k]`` (``augment``,
    then ``randaugment=(num_ops, magnitude)`` when num_ops > 0).
    ``shards`` and ``members`` (``common/data/shards.py``): the samples are tar members, sample i is
    ``members[i] = (shard, offset, size)``, and ``files[i]`` only names it in messages.
    With ``skip_bad``, a file that does not decode is replaced by the next one in the list that does
    (deterministic: the same in every process), counted in ``bad_files``, warned once per file;
    without it, BadImageError names the file. Raises ValueError for channels other than 1 or 3, a size
    below 1, an unknown ``augment`` or a ``randaugment`` outside (>= 0 ops, magnitude 0..30).
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        image_size: int,
        channels: int,
        *,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        augment: str = "none",
        skip_bad: bool = False,
        shards: Sequence[str] | None = None,
        members: np.ndarray | None = None,
        randaugment: tuple[int, int] = (0, 0),
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"image folders give 1 (grayscale) or 3 (RGB) channels, not {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        num_ops, magnitude = (int(v) for v in randaugment)
        if num_ops < 0 or not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(
                f"randaugment (num_ops, magnitude) must be (>= 0, 0..{MAX_MAGNITUDE}), got {randaugment}"
            )
        self.randaugment = (num_ops, magnitude)
        self.shards: list[str] | None = None
        self.members: np.ndarray | None = None
        if members is not None:
            if shards is None:
                raise ValueError("ImageFiles: members index into shards; give both")
            self.shards, self.members = list(shards), members
            files = [f"{self.shards[s]}@{off}" for s, off, _ in members.tolist()]
        self.files = np.asarray([str(f) for f in files], dtype=object)
        self.image_size, self.channels, self.augment, self.skip_bad = image_size, channels, augment, skip_bad
        self.mean = torch.zeros(channels) if mean is None else mean.float().reshape(channels)
        self.std = torch.ones(channels) if std is None else std.float().reshape(channels)
        self.bad_files: set[str] = set()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.channels, self.image_size, self.image_size)

    @property
    def augmented(self) -> bool:
        """Whether the training view differs from the eval view (crop-flip or RandAugment on)."""
        return self.augment != "none" or self.randaugment[0] > 0

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageFiles:
        """The same decoding over a subset of the files, in the order given."""
        idx = torch.as_tensor(indices, dtype=torch.int64).numpy()
        out = ImageFiles(
            list(self.files[idx]),
            self.image_size,
            self.channels,
            mean=self.mean,
            std=self.std,
            augment=self.augment,
            skip_bad=self.skip_bad,
            shards=self.shards,
            members=None if self.members is None else self.members[idx],
            randaugment=self.randaugment,
        )
        return out

    def with_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> ImageFiles:
        out = self.subset(range(len(self)))
        out.mean, out.std = mean.float().reshape(self.channels), std.float().reshape(self.channels)
        return out

    def _raw(self, i: int, seed: int | None) -> torch.Tensor:
        n = len(self.files)
        for k in range(n):
            j = (i + k) % n
            path = self.files[j]
            try:
                data = None
                if self.members is not None and self.shards is not None:  # set together
                    try:
                        data = read_member(self.shards, self.members[j])
                    except OSError as e:
                        raise BadImageError(path, str(e)) from e
                return image_tensor(
                    path, self.image_size, self.channels, self.augment, seed, data, self.randaugment
                )
            except BadImageError as e:
                if not self.skip_bad:
                    raise
                if path not in self.bad_files:
                    self.bad_files.add(path)
                    _log.warning("skipping %s (%d bad so far)", e, len(self.bad_files))
        raise BadImageError(self.files[i], "no file of this set decodes")

    def load_uint8(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 [len(indices), C, S, S]; sample k augmented from ``seeds[k]`` when given."""
        out = torch.empty((len(indices), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        for k, i in enumerate(indices):
            out[k] = self._raw(int(i), None if seeds is None else int(seeds[k]))
        return out

    def normalise(self, u8: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / (255.0 * self.std)
        return u8.float().mul_(scale.view(1, -1, 1, 1)).sub_((self.mean / self.std).view(1, -1, 1, 1))

    def load(self, indices: Sequence[int], seeds: Sequence[int] | None = None) -> torch.Tensor:
        """float32 [len(indices), C, S, S], normalised; the training view when ``seeds`` are given."""
        return self.normalise(self.load_uint8(indices, seeds))

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, int):
            return self.load([key])[0]
        if isinstance(key, slice):
            return self.load(range(*key.indices(len(self))))
        return self.load(torch.as_tensor(key).reshape(-1).tolist())

    def __repr__(self) -> str:
        return (
            f"ImageFiles({len(self)} files, {self.channels}x{self.image_size}x{self.image_size}, "
            f"augment={self.augment!r}, randaugment={self.randaugment}, skip_bad={self.skip_bad})"
        )


def channel_stats(images: ImageFiles, sample: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of pixels / 255 over a fixed sample of ``sample`` files (eval view):
    the same numbers in every process that has the same files and seed, without a pass over all."""
    n = len(images)
    idx = torch.randperm(n, generator=generator(seed))[: min(n, sample)].sort().values.tolist()
    x = images.load_uint8(idx).double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6) if x.numel() > x.shape[1] else torch.ones(images.channels)
    return mean.float(), std.float()
