"""Offline datasets and deterministic, stateless per-head batching.

Datasets: scikit-learn's bundled digits, Fashion-MNIST from local IDX files, a user's
class-per-folder image tree, and the paper's synthetic full-rank linear regression (App. A.3).

Batching is a pure function of (seed, head_id, step): a head can move to another process
or worker and resume exactly where it stopped, with no iterator state to carry over.
All randomness goes through explicitly seeded `torch.Generator`s, never the global RNG.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATASET_NAMES = ("digits", "fashion-mnist", "imagefolder", "synthetic-regression", "text")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Dataset:
    """Tensors on CPU. Images are float32 [N, C, H, W], normalised with the train set's statistics."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int  # 0 for regression
    in_channels: int
    image_size: int
    task: str  # "classification" | "regression"
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. class names, mean/std, target_weight

    @property
    def output_dim(self) -> int:
        """Width of the model's output: classes, or the regression target's size."""
        return self.num_classes if self.task == "classification" else int(self.train_y.shape[1])


def load_dataset(name: str, data_dir: str | None = None, *, seed: int = 0, **kwargs: Any) -> Dataset:
    """Load a dataset by name; `seed` fixes any train/test split and synthetic draw.

    kwargs per dataset:
      digits: test_fraction=0.2
      fashion-mnist: none (the official 60000/10000 split)
      imagefolder: image_size=32, grayscale=False, test_fraction=0.2 (data_dir required)
      synthetic-regression: d_in=64, d_out=64, num_train=4096, num_test=1024, noise_std=0.0
      text: eval_tokens=65536 (data_dir required: token files from lte-prepare-text; returns a
        lte.common.text.TokenDataset, task "lm")
    """
    key = name.lower().replace("_", "-")
    loaders = {
        "digits": _load_digits,
        "fashion-mnist": _load_fashion_mnist,
        "imagefolder": _load_imagefolder,
        "synthetic-regression": _load_synthetic_regression,
        "text": _load_text,
    }
    if key not in loaders:
        raise ValueError(f"unknown dataset '{name}'; choose one of {DATASET_NAMES}")
    return loaders[key](data_dir, seed=seed, **kwargs)


def _load_text(data_dir: str | None, *, seed: int, **kwargs: Any):
    from lte.common.text import load_text  # text imports this module's seeding helpers

    return load_text(data_dir, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------
# Shared helpers


def _mixed_seed(*parts: int) -> int:
    """A 63-bit seed from integers, identical in every process (unlike Python's hash())."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train and test indices; each class contributes round(test_fraction * count) to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = _generator(seed)
    train, test = [], []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).squeeze(1)
        members = members[torch.randperm(members.numel(), generator=g)]
        n_test = round(test_fraction * members.numel())
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _normalise(
    train_x: torch.Tensor, test_x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel standardisation of [N, C, H, W] images with the train set's mean and std."""
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std, mean.flatten(), std.flatten()


# ---------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download)


def _load_digits(data_dir: str | None, *, seed: int, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # pixels are 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    train_x, test_x, mean, std = _normalise(x[train_idx], x[test_idx])
    return Dataset(
        name="digits",
        train_x=train_x,
        train_y=y[train_idx],
        test_x=test_x,
        test_y=y[test_idx],
        num_classes=10,
        in_channels=1,
        image_size=8,
        task="classification",
        extras={"mean": mean, "std": std},
    )


# ---------------------------------------------------------------------------------------
# fashion-mnist: the IDX files (gzip or plain) from Debian's dataset-fashion-mnist package

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # ubyte data, 3 dims / 1 dim


def _find_idx_file(root: Path, stem: str) -> Path:
    # the official names use "-idx3-ubyte"; some mirrors write ".idx3-ubyte"
    dotted = stem.replace("-idx", ".idx")
    candidates = [root / f"{s}{ext}" for s in (stem, dotted) for ext in (".gz", "")]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; "
        "install with `apt-get install dataset-fashion-mnist` or pass --data-dir"
    )


@lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int, kind: str) -> torch.Tensor:
    # mtime and size are in the key so a replaced file is re-read
    try:
        raw = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"corrupt IDX file {path}: {e}") from e
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != _IDX_MAGIC[kind]:
        raise ValueError(f"corrupt IDX file {path}: bad magic number, expected {_IDX_MAGIC[kind]:#010x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt IDX file {path}: truncated header")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(shape))
    if len(raw) != header + count:
        raise ValueError(
            f"corrupt IDX file {path}: header says {shape} ({count} bytes), found {len(raw) - header} bytes"
        )
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy())


def read_idx(path: str | os.PathLike[str], kind: str) -> torch.Tensor:
    """Parse an IDX file of unsigned bytes ('images' or 'labels'); cached in-process by path."""
    p = Path(path)
    stat = p.stat()
    return _read_idx_cached(str(p.resolve()), stat.st_mtime_ns, stat.st_size, kind)


def _uint8_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of images / 255, exact, from a 256-bin histogram (one cheap pass)."""
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / (n - 1)
    return mean.item(), var.sqrt().item()


def _load_fashion_mnist(data_dir: str | None, *, seed: int) -> Dataset:
    root = Path(data_dir or FASHION_MNIST_DIR)
    split = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx_file(root, f"{prefix}-images-idx3-ubyte"), "images")
        labels = read_idx(_find_idx_file(root, f"{prefix}-labels-idx1-ubyte"), "labels")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{part}: {images.shape[0]} images but {labels.shape[0]} labels in {root}")
        split[part] = (images, labels)
    train_u8, test_u8 = split["train"][0], split["test"][0]
    mean, std = _uint8_stats(train_u8)

    def to_float(u8: torch.Tensor) -> torch.Tensor:
        # (u8 / 255 - mean) / std folded into one in-place scale and shift: no temporaries of 188 MB
        return u8.float().mul_(1.0 / (255.0 * std)).add_(-mean / std).unsqueeze(1)

    return Dataset(
        name="fashion-mnist",
        train_x=to_float(train_u8),
        train_y=split["train"][1].long(),
        test_x=to_float(test_u8),
        test_y=split["test"][1].long(),
        num_classes=10,
        in_channels=1,
        image_size=28,
        task="classification",
        extras={
            "mean": torch.tensor([mean]),
            "std": torch.tensor([std]),
            "classes": list(FASHION_MNIST_CLASSES),
        },
    )


# ---------------------------------------------------------------------------------------
# imagefolder: root/train/<class>/*, root/test/<class>/*, or root/<class>/* split by seed


def _list_class_folders(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            classes[d.name] = files
    return classes


def _read_images(files: list[Path], image_size: int, mode: str) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("the imagefolder dataset needs Pillow: pip install pillow") from e
    arrays = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(im, dtype=np.uint8).reshape(image_size, image_size, -1))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # [N, C, H, W]


def _load_imagefolder(
    data_dir: str | None,
    *,
    seed: int,
    image_size: int = 32,
    grayscale: bool = False,
    test_fraction: float = 0.2,
) -> Dataset:
    if data_dir is None:
        raise ValueError("the imagefolder dataset needs a folder: pass data_dir (--data-dir)")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} is not a directory")
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    train_folders = _list_class_folders(root / "train" if has_split else root)
    if not train_folders:
        raise ValueError(
            f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {root}"
        )
    classes = list(train_folders)
    index = {c: i for i, c in enumerate(classes)}

    def labelled(folders: dict[str, list[Path]]) -> tuple[list[Path], torch.Tensor]:
        files = [f for c in folders for f in folders[c]]
        labels = torch.tensor([index[c] for c in folders for _ in folders[c]], dtype=torch.int64)
        return files, labels

    mode = "L" if grayscale else "RGB"
    files, y = labelled(train_folders)
    x = _read_images(files, image_size, mode)
    if has_split:
        test_folders = _list_class_folders(root / "test")
        unknown = sorted(set(test_folders) - set(classes))
        if unknown:
            raise ValueError(f"imagefolder: test classes {unknown} have no folder under {root / 'train'}")
        test_files, test_y = labelled(test_folders)
        train_x, train_y, test_x = x, y, _read_images(test_files, image_size, mode)
    else:
        train_idx, test_idx = _stratified_split(y, test_fraction, seed)
        train_x, train_y, test_x, test_y = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    train_x, test_x, mean, std = _normalise(train_x, test_x)
    return Dataset(
        name="imagefolder",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=len(classes),
        in_channels=1 if grayscale else 3,
        image_size=image_size,
        task="classification",
        extras={"classes": classes, "mean": mean, "std": std, "root": str(root)},
    )


# ---------------------------------------------------------------------------------------
# synthetic-regression: y = W* x (+ noise) with a fixed random full-rank W* (paper App. A.3)


def _load_synthetic_regression(
    data_dir: str | None,
    *,
    seed: int,
    d_in: int = 64,
    d_out: int = 64,
    num_train: int = 4096,
    num_test: int = 1024,
    noise_std: float = 0.0,
) -> Dataset:
    """x ~ N(0, I) of shape [N, d_in]; y = x W*^T of shape [N, d_out].

    W* entries are N(0, 1/d_in) so targets have unit variance; a Gaussian matrix has full
    rank min(d_out, d_in) with probability 1 (the tests check it). For build_model, the
    dataset reports in_channels=d_in and image_size=1, so the MLP's in_features is d_in.
    """
    g = _generator(seed)
    target_weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    x = torch.randn(num_train + num_test, d_in, generator=g)
    y = x @ target_weight.T
    if noise_std > 0:
        y = y + noise_std * torch.randn(y.shape, generator=g)
    return Dataset(
        name="synthetic-regression",
        train_x=x[:num_train],
        train_y=y[:num_train],
        test_x=x[num_train:],
        test_y=y[num_train:],
        num_classes=0,
        in_channels=d_in,
        image_size=1,
        task="regression",
        extras={"target_weight": target_weight, "noise_std": noise_std},
    )


# ---------------------------------------------------------------------------------------
# Sharding and batching: pure functions of (seed, head_id, step)


def shard_indices(num_samples: int, shard_id: int, num_shards: int, seed: int) -> torch.Tensor:
    """Head `shard_id`'s sample indices: a permutation fixed by `seed`, then every num_shards-th entry.

    The shards of 0..num_shards-1 are disjoint and together cover range(num_samples).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} out of range for {num_shards} shards")
    perm = torch.randperm(num_samples, generator=_generator(seed))
    return perm[shard_id::num_shards]


class HeadBatches:
    """Batch k of head `head_id`'s shard, as a pure function of (seed, head_id, k).

    The head reads an endless stream: its shard reshuffled each epoch (generator seeded from
    (seed, head_id, epoch)), epochs laid end to end. Batch k is positions k*bs .. k*bs+bs-1 of
    that stream, so a batch may straddle an epoch boundary, and a shard smaller than the batch
    size wraps around (samples repeat within the batch). Batches are never short.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, head_id: int, num_heads: int, batch_size: int, seed: int
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.head_id, self.num_heads = head_id, num_heads
        self.batch_size, self.seed = batch_size, seed
        self.shard = shard_indices(x.shape[0], head_id, num_heads, seed)
        if self.shard.numel() == 0:
            raise ValueError(f"head {head_id}'s shard is empty: {x.shape[0]} samples for {num_heads} heads")
        self._epoch_cache: dict[int, torch.Tensor] = {}

    @property
    def shard_size(self) -> int:
        return self.shard.numel()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The shard's sample indices in epoch `epoch`'s order."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) >= 4:  # batches move forward; old epochs are rarely revisited
                self._epoch_cache.clear()
            g = _generator(_mixed_seed(self.seed, self.head_id, epoch))
            self._epoch_cache[epoch] = self.shard[torch.randperm(self.shard_size, generator=g)]
        return self._epoch_cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Row indices into x / y of batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n, start = self.shard_size, step * self.batch_size
        stop = start + self.batch_size
        parts = []
        while start < stop:
            epoch, offset = divmod(start, n)
            take = min(n - offset, stop - start)
            parts.append(self._epoch_order(epoch)[offset : offset + take])
            start += take
        return torch.cat(parts)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step)
        return self.x[idx], self.y[idx]

    def __repr__(self) -> str:
        return (
            f"HeadBatches(head_id={self.head_id}, num_heads={self.num_heads}, "
            f"batch_size={self.batch_size}, shard_size={self.shard_size}, seed={self.seed})"
        )


def head_batches(dataset: Any, head_id: int, num_heads: int, batch_size: int, seed: int, context: int = 0):
    """A head's batch stream: ``HeadBatches`` over a sample dataset, ``TokenBatches`` of ``context``
    tokens over token data (task "lm"). Both are pure functions of (seed, head_id, step)."""
    if dataset.task == "lm":
        from lte.common.text import TokenBatches

        return TokenBatches(dataset.train_tokens, head_id, num_heads, batch_size, seed, context)
    return HeadBatches(dataset.train_x, dataset.train_y, head_id, num_heads, batch_size, seed)


def stacked_batch(streams: list[HeadBatches], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's batch `step`, concatenated in list order: head i's rows are i*bs:(i+1)*bs."""
    if not streams:
        raise ValueError("stacked_batch needs at least one stream")
    if len({s.batch_size for s in streams}) != 1:
        raise ValueError("all streams must share one batch_size so rows split evenly across heads")
    xs, ys = zip(*(s.batch(step) for s in streams), strict=True)
    return torch.cat(xs), torch.cat(ys)


def iterate_eval(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches in order; the last one may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]
