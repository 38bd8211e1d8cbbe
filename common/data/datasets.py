"""Offline datasets and deterministic, stateless per-head batching.

Datasets: scikit-learn's bundled digits, Fashion-MNIST from local IDX files, a user's
class-per-folder image tree or WebDataset shards (both streamed from disk), and the paper's synthetic full-rank linear regression (App. A.3).

Batching is a pure function of (seed, head_id, step): a head can move to another process
or worker and resume exactly where it stopped, with no iterator state to carry over.
All randomness goes through explicitly seeded `torch.Generator`s, never the global RNG.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from lte.common.data.images import IMAGE_EXTENSIONS, ImageFiles, channel_stats, scan_class_folders
from lte.common.data.seeds import generator, mixed_seed
from lte.common.data.shards import index_shards, shard_files
from lte.common.data.text import TokenBatches, TokenDataset, load_text

_log = logging.getLogger("lte.data")
SYNTHETIC_D_IN, SYNTHETIC_D_OUT = 64, 64  # synthetic-regression's input and target widths

DATASET_NAMES = ("digits", "fashion-mnist", "imagefolder", "webdataset", "synthetic-regression", "text")

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
EVAL_STATS_SAMPLE = 256  # image-folder normalisation: per-channel stats of this many training files


class Images(Protocol):
    """A Dataset's ``train_x`` / ``test_x``: a float32 tensor [N, C, H, W], or ``ImageFiles`` or
    ``ResizedImages`` standing in for one (``shape``, ``len()`` and ``x[indices]``)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> torch.Tensor: ...


class ResizedImages:
    """In-memory images [N, C, h, w] seen at ``size`` x ``size``: ``x[idx]`` resizes the rows it returns
    (bilinear, antialiased), so a larger ``--image-size`` costs memory per batch, not per dataset."""

    def __init__(self, images: torch.Tensor, size: int) -> None:
        self.images, self.size = images, size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.images.shape[0], self.images.shape[1], self.size, self.size)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        rows = self.images[key]
        single = rows.dim() == 3
        out = F.interpolate(
            rows.unsqueeze(0) if single else rows,
            size=(self.size, self.size),
            mode="bilinear",
            antialias=True,
        )
        return out[0] if single else out


@dataclass
class Dataset:
    """Images are float32 [N, C, H, W], normalised with the train set's statistics.

    ``train_x`` / ``test_x`` are CPU tensors for the small built-in sets, and for image folders
    ``ImageFiles`` (decoded from disk as indexed) or, resized, ``ResizedImages``: anything with
    ``shape``, ``len()`` and ``x[indices]`` giving a float32 tensor.
    """

    name: str
    train_x: Images
    train_y: torch.Tensor
    test_x: Images
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


def load_dataset(
    name: str, data_dir: str | None = None, *, seed: int = 0, **kwargs: Any
) -> Dataset | TokenDataset:
    """Load a dataset by name; `seed` fixes any train/test split and synthetic draw.

    kwargs per dataset:
      digits: test_fraction=0.2
      fashion-mnist: none (the official 60000/10000 split)
      imagefolder, webdataset: image_size=32, grayscale=False, channels=0, test_fraction=0.2,
        classes=None, augment="crop-flip", randaugment=(0, 0), skip_bad_images=False (data_dir required)
      synthetic-regression: d_in=64, d_out=64, num_train=4096, num_test=1024, noise_std=0.0
      text: eval_tokens=65536 (data_dir required: token files from lte-prepare-text; returns a
        lte.common.data.text.TokenDataset, task "lm")
    """
    key = name.lower().replace("_", "-")
    loaders: dict[str, Callable[..., Any]] = {
        "digits": _load_digits,
        "fashion-mnist": _load_fashion_mnist,
        "imagefolder": _load_imagefolder,
        "webdataset": _load_webdataset,
        "synthetic-regression": _load_synthetic_regression,
        "text": _load_text,
    }
    if key not in loaders:
        raise ValueError(f"unknown dataset '{name}'; choose one of {DATASET_NAMES}")
    return loaders[key](data_dir, seed=seed, **kwargs)


def _resized(x: torch.Tensor, image_size: int, name: str, native: int):
    """The built-in sets at ``--image-size`` (0: native), resized per batch."""
    if image_size < 0:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    return x if image_size in (0, native) else ResizedImages(x, image_size)


def _load_text(data_dir: str | None, *, seed: int, **kwargs: Any):
    return load_text(data_dir, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------
# Shared helpers


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train and test indices; each class contributes round(test_fraction * count) to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = generator(seed)
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


def _load_digits(
    data_dir: str | None, *, seed: int, test_fraction: float = 0.2, image_size: int = 0
) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # pixels are 0..16
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    train_x, test_x, mean, std = _normalise(x[train_idx], x[test_idx])
    return Dataset(
        name="digits",
        train_x=_resized(train_x, image_size, "digits", 8),
        train_y=y[train_idx],
        test_x=_resized(test_x, image_size, "digits", 8),
        test_y=y[test_idx],
        num_classes=10,
        in_channels=1,
        image_size=image_size or 8,
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


def _load_fashion_mnist(data_dir: str | None, *, seed: int, image_size: int = 0) -> Dataset:
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
        train_x=_resized(to_float(train_u8), image_size, "fashion-mnist", 28),
        train_y=split["train"][1].long(),
        test_x=_resized(to_float(test_u8), image_size, "fashion-mnist", 28),
        test_y=split["test"][1].long(),
        num_classes=10,
        in_channels=1,
        image_size=image_size or 28,
        task="classification",
        extras={
            "mean": torch.tensor([mean]),
            "std": torch.tensor([std]),
            "classes": list(FASHION_MNIST_CLASSES),
        },
    )


# ---------------------------------------------------------------------------------------
# imagefolder: root/train/<class>/*, root/test/<class>/*, or root/<class>/* split by seed


def _split_folders(root: Path) -> tuple[Path, Path | None]:
    """(train folder, test folder or None): root/train with root/val or root/test, else root itself."""
    if (root / "train").is_dir():
        for name in ("val", "test"):
            if (root / name).is_dir():
                return root / "train", root / name
        raise ValueError(
            f"imagefolder: {root} has train/ but no val/ or test/ folder; add one, or put the class "
            "folders directly under the root to split them by --seed"
        )
    return root, None


def _map_classes(
    folders: dict[str, list[Path]], root: Path, classes: tuple[str, ...] | list[str] | None
) -> tuple[list[str], dict[str, int]]:
    """The class list and folder -> label map: the job's names when given (a worker's own data),
    else the non-empty folders in sorted order. Unknown folders are refused; missing ones warned."""
    present = [c for c, files in folders.items() if files]
    empty = [c for c, files in folders.items() if not files]
    if not classes:
        if empty:
            _log.warning("imagefolder: class folder(s) %s under %s hold no images; ignored", empty, root)
        return present, {c: i for i, c in enumerate(present)}
    job_classes = list(classes)
    unknown = [c for c in present if c not in job_classes]
    if unknown:
        raise ValueError(
            f"imagefolder: class folder(s) {unknown} under {root} are not among the job's classes "
            f"{job_classes}; remove or rename them"
        )
    missing = [c for c in job_classes if c not in present]
    if missing:
        _log.warning("imagefolder: no images of the job's class(es) %s under %s", missing, root)
    return job_classes, {c: job_classes.index(c) for c in present}


def _load_imagefolder(
    data_dir: str | None,
    *,
    seed: int,
    image_size: int = 0,
    grayscale: bool = False,
    channels: int = 0,
    test_fraction: float = 0.2,
    classes: tuple[str, ...] | list[str] | None = None,
    augment: str = "",
    skip_bad_images: bool = False,
    randaugment: tuple[int, int] = (0, 0),
) -> Dataset:
    """Class-per-folder images, streamed from disk (``ImageFiles``); see ``common/data/images.py``.

    ``image_size`` 0: 32. ``channels`` 1 or 3 (0: 1 if ``grayscale`` else 3). ``classes``: the
    job's class names, to map a worker's own folders by name. ``augment`` "": crop-flip.
    ``randaugment``: (num_ops, magnitude) of RandAugment on the training view; 0 ops: off.
    Normalisation: per-channel mean and std of a fixed sample of training files (EVAL_STATS_SAMPLE).
    """
    if data_dir is None:
        raise ValueError("the imagefolder dataset needs a folder: pass data_dir (--data-dir)")
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError("the imagefolder dataset needs Pillow: pip install pillow") from e
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} is not a directory")
    image_size = image_size or 32
    channels = channels or (1 if grayscale else 3)
    augment = augment or "crop-flip"
    train_root, test_root = _split_folders(root)
    train_folders = scan_class_folders(train_root)
    if not any(train_folders.values()):
        raise ValueError(
            f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {train_root}"
        )
    class_names, index = _map_classes(train_folders, train_root, classes)

    def labelled(folders: dict[str, list[Path]]) -> tuple[list[Path], torch.Tensor]:
        kept = [c for c in folders if c in index]
        files = [f for c in kept for f in folders[c]]
        labels = torch.tensor([index[c] for c in kept for _ in folders[c]], dtype=torch.int64)
        return files, labels

    files, y = labelled(train_folders)
    if test_root is not None:
        test_folders = scan_class_folders(test_root)
        unknown = sorted(c for c, f in test_folders.items() if f and c not in index)
        if unknown:
            raise ValueError(
                f"imagefolder: test classes {unknown} under {test_root} have no images under {train_root}"
            )
        test_files, test_y = labelled(test_folders)
        train_files, train_y = files, y
    else:
        if y.numel() < 2:
            raise ValueError(f"imagefolder: {train_root} holds {y.numel()} image; a train/test split needs 2")
        train_idx, test_idx = _stratified_split(y, test_fraction, seed)
        train_files = [files[i] for i in train_idx.tolist()]
        test_files = [files[i] for i in test_idx.tolist()]
        train_y, test_y = y[train_idx], y[test_idx]
    train_x = ImageFiles(
        train_files, image_size, channels, augment=augment, skip_bad=skip_bad_images, randaugment=randaugment
    )
    test_x = ImageFiles(test_files, image_size, channels, skip_bad=skip_bad_images)
    return _image_dataset("imagefolder", root, train_x, train_y, test_x, test_y, class_names, seed)


def _image_dataset(
    name: str,
    root: Path,
    train_x: ImageFiles,
    train_y: torch.Tensor,
    test_x: ImageFiles,
    test_y: torch.Tensor,
    class_names: list[str],
    seed: int,
) -> Dataset:
    """A streamed image Dataset, normalised with the stats of a fixed sample of training files."""
    mean, std = channel_stats(train_x, EVAL_STATS_SAMPLE, seed)
    return Dataset(
        name=name,
        train_x=train_x.with_normalisation(mean, std),
        train_y=train_y,
        test_x=test_x.with_normalisation(mean, std),
        test_y=test_y,
        num_classes=len(class_names),
        in_channels=train_x.channels,
        image_size=train_x.image_size,
        task="classification",
        extras={
            "classes": class_names,
            "mean": mean,
            "std": std,
            "root": str(root),
            "augment": train_x.augment,
        },
    )


# ---------------------------------------------------------------------------------------
# webdataset: .tar shards (common/data/shards.py), root/train/*.tar with root/val|test/*.tar, or root/*.tar


def _load_webdataset(
    data_dir: str | None,
    *,
    seed: int,
    image_size: int = 0,
    grayscale: bool = False,
    channels: int = 0,
    test_fraction: float = 0.2,
    classes: tuple[str, ...] | list[str] | None = None,
    augment: str = "",
    skip_bad_images: bool = False,
    randaugment: tuple[int, int] = (0, 0),
) -> Dataset:
    """Samples of WebDataset shards, streamed by random access; options as for imagefolder.

    Class names: ``root/classes.txt`` (one per line, label i on line i), else "0", "1", ...
    """
    if data_dir is None:
        raise ValueError("the webdataset dataset needs a folder of .tar shards: pass --data-dir")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"webdataset: {root} is not a directory")
    image_size, channels, augment = (
        image_size or 32,
        channels or (1 if grayscale else 3),
        augment or "crop-flip",
    )
    train_root, test_root = _split_folders(root)
    train_shards = shard_files(train_root)
    if not train_shards:
        raise ValueError(f"webdataset: no .tar shards in {train_root}")
    paths, members, y = index_shards(train_shards)
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    else:
        names = [str(i) for i in range(int(y.max()) + 1 if y.numel() else 0)]

    def relabel(labels: torch.Tensor, where: Path) -> tuple[torch.Tensor, list[str]]:
        bad = labels[(labels < 0) | (labels >= len(names))]
        if bad.numel():
            raise ValueError(
                f"webdataset: label {int(bad[0])} in {where} has no class in {names_file if names_file.is_file() else 'the labels'}"
                f" ({len(names)} classes); fix the .cls files or classes.txt"
            )
        if not classes:
            return labels, names
        folders = {n: [Path(n)] if bool((labels == i).any()) else [] for i, n in enumerate(names)}
        class_names, index = _map_classes(folders, where, classes)
        lookup = torch.tensor([index.get(n, -1) for n in names], dtype=torch.int64)
        return lookup[labels], class_names

    y, class_names = relabel(y, train_root)
    if test_root is not None:
        test_shards = shard_files(test_root)
        test_paths, test_members, test_y = index_shards(test_shards) if test_shards else ([], None, y[:0])
        test_y, _ = relabel(test_y, test_root)
    else:
        train_idx, test_idx = _stratified_split(y, test_fraction, seed)
        test_paths, test_members, test_y = paths, members[test_idx.numpy()], y[test_idx]
        members, y = members[train_idx.numpy()], y[train_idx]
    train_x = ImageFiles(
        [],
        image_size,
        channels,
        augment=augment,
        skip_bad=skip_bad_images,
        shards=paths,
        members=members,
        randaugment=randaugment,
    )
    test_x = ImageFiles(
        [],
        image_size,
        channels,
        skip_bad=skip_bad_images,
        shards=test_paths,
        members=test_members if test_members is not None else np.zeros((0, 3), dtype=np.int64),
    )
    return _image_dataset("webdataset", root, train_x, y, test_x, test_y, class_names, seed)


# ---------------------------------------------------------------------------------------
# synthetic-regression: y = W* x (+ noise) with a fixed random full-rank W* (paper App. A.3)


def _load_synthetic_regression(
    data_dir: str | None,
    *,
    seed: int,
    d_in: int = SYNTHETIC_D_IN,
    d_out: int = SYNTHETIC_D_OUT,
    num_train: int = 4096,
    num_test: int = 1024,
    noise_std: float = 0.0,
    image_size: int = 0,
) -> Dataset:
    """x ~ N(0, I) of shape [N, d_in]; y = x W*^T of shape [N, d_out].

    W* entries are N(0, 1/d_in) so targets have unit variance; a Gaussian matrix has full
    rank min(d_out, d_in) with probability 1 (the tests check it). For build_model, the
    dataset reports in_channels=d_in and image_size=1, so the MLP's in_features is d_in.
    """
    if image_size not in (0, 1):
        raise ValueError(f"--image-size {image_size}: synthetic-regression has no images; leave it out")
    g = generator(seed)
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
    perm = torch.randperm(num_samples, generator=generator(seed))
    return perm[shard_id::num_shards]


class HeadBatches:
    """Batch k of head `head_id`'s shard, as a pure function of (seed, head_id, k).

    The head reads an endless stream: its shard reshuffled each epoch (generator seeded from
    (seed, head_id, epoch)), epochs laid end to end. Batch k is positions k*bs .. k*bs+bs-1 of
    that stream, so a batch may straddle an epoch boundary, and a shard smaller than the batch
    size wraps around (samples repeat within the batch). Batches are never short.
    """

    def __init__(
        self,
        x: Images,
        y: torch.Tensor,
        head_id: int,
        num_heads: int,
        batch_size: int,
        seed: int,
        *,
        shard_of: tuple[int, int] | None = None,
    ) -> None:
        """``shard_of=(i, k)``: read shard i of k instead of shard ``head_id`` of ``num_heads`` (a
        worker's own data, split over the heads it holds); order and augmentation still follow head_id."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.head_id, self.num_heads = head_id, num_heads
        self.batch_size, self.seed = batch_size, seed
        shard_id, num_shards = shard_of or (head_id, num_heads)
        self.shard = shard_indices(x.shape[0], shard_id, num_shards, seed)
        if self.shard.numel() == 0:
            raise ValueError(
                f"head {head_id}'s shard is empty: {x.shape[0]} samples for {num_shards} heads; "
                "use fewer --heads or more data"
            )
        self._epoch_cache: dict[int, torch.Tensor] = {}

    @property
    def shard_size(self) -> int:
        return self.shard.numel()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The shard's sample indices in epoch `epoch`'s order."""
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) >= 4:  # batches move forward; old epochs are rarely revisited
                self._epoch_cache.clear()
            g = generator(mixed_seed(self.seed, self.head_id, epoch))
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

    def sample_seeds(self, step: int) -> list[int]:
        """The augmentation seed of each position of batch ``step``: a function of (seed, head, step, position)."""
        return [mixed_seed(self.seed, self.head_id, step, pos) for pos in range(self.batch_size)]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step)
        if isinstance(self.x, ImageFiles) and self.x.augmented:
            return self.x.load(idx.tolist(), self.sample_seeds(step)), self.y[idx]
        return self.x[idx], self.y[idx]

    def __repr__(self) -> str:
        return (
            f"HeadBatches(head_id={self.head_id}, num_heads={self.num_heads}, "
            f"batch_size={self.batch_size}, shard_size={self.shard_size}, seed={self.seed})"
        )


def head_shard(head_id: int, num_heads: int, head_data: str = "shard") -> tuple[int, int]:
    """``(shard, of)`` a head reads of a sample dataset: ``(head_id, num_heads)``, its fixed 1/N
    (``head_data`` "shard"), or ``(0, 1)``, the whole set (``"iid"``: every head draws from all of
    it, as the paper authors' code does, each head in its own order). Raises ``ValueError`` for
    another ``head_data``."""
    if head_data == "shard":
        return head_id, num_heads
    if head_data == "iid":
        return 0, 1
    raise ValueError(f"head_data must be 'shard' or 'iid', got {head_data!r}")


def head_batches(
    dataset: Any,
    head_id: int,
    num_heads: int,
    batch_size: int,
    seed: int,
    context: int = 0,
    head_data: str = "shard",
):
    """A head's batch stream: ``HeadBatches`` over a sample dataset (its shard, or the whole set:
    ``head_shard``), ``TokenBatches`` of ``context`` tokens over token data (task "lm", always the
    whole file). Both are pure functions of (seed, head_id, step)."""
    if dataset.task == "lm":
        return TokenBatches(dataset.train_tokens, head_id, num_heads, batch_size, seed, context)
    shard = head_shard(head_id, num_heads, head_data)
    return HeadBatches(dataset.train_x, dataset.train_y, head_id, num_heads, batch_size, seed, shard_of=shard)


def stacked_batch(streams: list[HeadBatches], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head's batch `step`, concatenated in list order: head i's rows are i*bs:(i+1)*bs."""
    if not streams:
        raise ValueError("stacked_batch needs at least one stream")
    if len({s.batch_size for s in streams}) != 1:
        raise ValueError("all streams must share one batch_size so rows split evenly across heads")
    xs, ys = zip(*(s.batch(step) for s in streams), strict=True)
    return torch.cat(xs), torch.cat(ys)


def own_data_shards(
    num_samples: int, head_ids: list[int], head_data: str = "shard"
) -> list[tuple[int, int] | None]:
    """How a worker's own data (``--data``) is split over the heads it holds: shard i of k for its
    i-th head, or, when it has fewer samples than heads, all of it for every head; with
    ``head_data`` "iid" every head reads all of it (the worker's own folder, never the job's)."""
    k = len(head_ids)
    if head_data == "iid":
        return [(0, 1)] * k
    if num_samples < k:
        _log.warning("own data: %d samples for %d heads; every head reads all of them", num_samples, k)
        return [(0, 1)] * k
    return [(i, k) for i in range(k)]


def eval_subset(dataset: Dataset | TokenDataset, count: int, seed: int) -> Dataset | TokenDataset:
    """A fixed class-balanced subset of ``count`` test samples (``--eval-samples``): each class's
    test samples in a seeded order, taken round-robin over classes, then sorted. ``count`` 0 or at
    least the test set's size: the whole test set."""
    if count < 0:
        raise ValueError(f"--eval-samples must be >= 0, got {count}")
    if count == 0:
        return dataset
    if not isinstance(dataset, Dataset):  # token data, task "lm"
        raise ValueError("--eval-samples picks test images; token data evaluates on val.bin's windows")
    n = len(dataset.test_y)
    if count >= n:
        return dataset
    if dataset.task != "classification":
        keep = torch.randperm(n, generator=generator(seed))[:count].sort().values
    else:
        g = generator(mixed_seed(seed, 0xE7A1))
        per_class = [
            members[torch.randperm(members.numel(), generator=g)]
            for c in torch.unique(dataset.test_y)
            for members in [torch.nonzero(dataset.test_y == c).squeeze(1)]
        ]
        longest = max(m.numel() for m in per_class)
        rounds = torch.full((len(per_class), longest), -1, dtype=torch.int64)
        for i, m in enumerate(per_class):
            rounds[i, : m.numel()] = m
        order = rounds.T.reshape(-1)
        keep = order[order >= 0][:count].sort().values
    return dataclasses.replace(dataset, test_x=_take(dataset.test_x, keep), test_y=dataset.test_y[keep])


def _take(x, idx: torch.Tensor):
    if isinstance(x, ImageFiles):
        return x.subset(idx)
    if isinstance(x, ResizedImages):
        return ResizedImages(x.images[idx], x.size)
    return x[idx]


def iterate_eval(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches in order; the last one may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


# ---------------------------------------------------------------------------------------
# A job's dataset, as the emulator, the server and a worker load it


def load_job_dataset(
    job: Any,
    data_dir: str | None = None,
    *,
    own_data: str | None = None,
    skip_bad_images: bool = False,
) -> Dataset | TokenDataset:
    """The dataset of ``job`` (a JobConfig) at the job's image size, channels and class names.

    ``own_data``: a worker's own folder (``lte-worker --data``) instead of the job's dataset: IDX
    files (Fashion-MNIST layout) or class folders mapped to the job's labels by name; marked in
    ``extras["own_data"]`` so that it is split over the heads the worker holds. Raises ValueError
    (or FileNotFoundError) with one line naming the option, folder or file at fault.
    """
    name = job.dataset.lower().replace("_", "-")
    if own_data:
        path = Path(own_data)
        if not path.is_dir():
            raise FileNotFoundError(f"--data {own_data}: not a directory")
        if name == "text":
            pass  # the worker's own token files (train.bin, val.bin)
        elif any(path.glob("*idx3-ubyte*")):
            name = "fashion-mnist"
        elif any(path.glob("*.tar")) or any(path.glob("train/*.tar")):
            name = "webdataset"
        else:
            name = "imagefolder"
        data_dir = own_data
    _check_job_options(job, name)
    if name == "text":  # token files: no image options
        return load_dataset(name, data_dir, seed=job.seed)
    kwargs: dict[str, Any] = {"image_size": job.image_size}
    if name in ("imagefolder", "webdataset"):
        kwargs.update(
            channels=job.in_channels,
            classes=job.classes or None,
            augment=job.augment,
            skip_bad_images=skip_bad_images,
            randaugment=(job.randaugment_ops, job.randaugment_magnitude),
        )
    dataset = load_dataset(name, data_dir, seed=job.seed, **kwargs)
    _check_against_job(dataset, job, own_data or data_dir or name)
    if own_data:
        dataset.extras["own_data"] = True
    return dataset


def _check_job_options(job: Any, name: str) -> None:
    """Refuse job options that the dataset ``name`` has no use for (augmentations off image
    folders, an image size for token data), naming the option."""
    if job.augment not in ("", "none") and name not in ("imagefolder", "webdataset"):
        raise ValueError(f"--augment {job.augment}: augmentations apply to image folders, not to {name}")
    if job.randaugment_ops and name not in ("imagefolder", "webdataset"):
        raise ValueError(
            f"--randaugment-ops {job.randaugment_ops}: RandAugment applies to image folders and shards, "
            f"not to {name}; leave it out (or 0)"
        )
    if name == "text" and job.image_size:
        raise ValueError(f"--image-size {job.image_size}: token data has no image size")


@dataclass
class DatasetMetadata:
    """What a job takes from its dataset (``JobConfig.with_dataset``), without the samples: the
    shape fields of :class:`Dataset`, ``extras`` holding ``classes`` and ``augment`` only."""

    name: str
    num_classes: int  # 0 for regression
    in_channels: int
    image_size: int
    task: str
    output_dim: int
    extras: dict[str, Any] = field(default_factory=dict)


def dataset_metadata(job: Any, data_dir: str | None = None) -> DatasetMetadata | TokenDataset:
    """The shape of ``job``'s dataset as ``load_job_dataset`` would load it, read cheaply: fixed
    values for digits, Fashion-MNIST and synthetic-regression (no file is read), the class folder
    names of an image folder, ``classes.txt`` or the shard index of WebDataset shards, and the
    token files' ``meta.json`` (memory-mapped, not read) for text. ``lte-server --print-config``
    resolves the job with it. Raises ValueError or FileNotFoundError naming the option or folder,
    as loading would.
    """
    name = job.dataset.lower().replace("_", "-")
    _check_job_options(job, name)
    if name == "text":
        return load_text(data_dir, seed=job.seed)
    if name == "synthetic-regression":
        if job.image_size not in (0, 1):
            raise ValueError(
                f"--image-size {job.image_size}: synthetic-regression has no images; leave it out"
            )
        return DatasetMetadata(name, 0, SYNTHETIC_D_IN, 1, "regression", SYNTHETIC_D_OUT)
    if name in ("digits", "fashion-mnist"):
        native, classes = (8, []) if name == "digits" else (28, list(FASHION_MNIST_CLASSES))
        meta = DatasetMetadata(name, 10, 1, job.image_size or native, "classification", 10)
        if classes:
            meta.extras["classes"] = classes
    elif name in ("imagefolder", "webdataset"):
        if data_dir is None:
            raise ValueError(f"the {name} dataset needs a folder: pass data_dir (--data-dir)")
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{name}: {root} is not a directory")
        train_root, _ = _split_folders(root)
        if name == "imagefolder":
            folders = scan_class_folders(train_root)
            if not any(folders.values()):
                raise ValueError(
                    f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {train_root}"
                )
            class_names, _ = _map_classes(folders, train_root, job.classes)
        elif job.classes:
            class_names = list(job.classes)
        elif (root / "classes.txt").is_file():
            lines = (root / "classes.txt").read_text().splitlines()
            class_names = [line.strip() for line in lines if line.strip()]
        else:
            shards = shard_files(train_root)
            if not shards:
                raise ValueError(f"webdataset: no .tar shards in {train_root}")
            labels = index_shards(shards)[2]
            class_names = [str(i) for i in range(int(labels.max()) + 1 if labels.numel() else 0)]
        meta = DatasetMetadata(
            name,
            len(class_names),
            job.in_channels or 3,
            job.image_size or 32,
            "classification",
            len(class_names),
            {"classes": class_names, "augment": job.augment or "crop-flip"},
        )
    else:
        raise ValueError(f"unknown dataset '{job.dataset}'; choose one of {DATASET_NAMES}")
    _check_against_job(meta, job, data_dir or name)
    return meta


def _check_against_job(dataset: Dataset | TokenDataset | DatasetMetadata, job: Any, source: str) -> None:
    """A dataset that cannot feed the job's model is refused here, not by a shape error in a layer."""
    problems = []
    if job.in_channels and dataset.in_channels != job.in_channels:
        problems.append(f"{dataset.in_channels} channel(s), the job's model takes {job.in_channels}")
    if job.image_size and dataset.image_size != job.image_size:
        problems.append(f"{dataset.image_size} px images, the job's model takes {job.image_size}")
    if job.num_classes and dataset.task == "classification" and dataset.num_classes > job.num_classes:
        problems.append(f"{dataset.num_classes} classes, the job has {job.num_classes}")
    if job.task and dataset.task != job.task:
        problems.append(f"a {dataset.task} task, the job is {job.task}")
    if problems:
        raise ValueError(f"data {source}: " + "; ".join(problems))
