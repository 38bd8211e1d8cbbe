"""WebDataset ``.tar`` shards, read by random access so that batches stay pure functions of
(seed, head, step).

Layout (the WebDataset convention, as ``webdataset.TarWriter`` / ``ShardWriter`` write it): each
sample is a group of tar members sharing a key (the name up to its first dot), one image
(``.png``, ``.jpg``, ...) and its integer label in ``.cls``. A dataset folder holds ``train/*.tar``
and ``val/*.tar`` (or ``test/*.tar``), or only ``*.tar`` files (split by the seed), and optionally
``classes.txt`` with one class name per line (label i is line i).

Why not the ``webdataset`` package's reader: its pipeline streams shards in order through a
shuffle buffer, so a head's sample at step k would depend on everything it read before; a moved
head or a resume could not continue its stream exactly. Instead each shard's member offsets are
indexed once at start-up (headers only, with the standard library's ``tarfile``) and a sample is
one seek and one read, from any process. Each worker can hold its own shards (``lte-worker
--data FOLDER``), which is how data reaches many machines.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import torch

from lte.common.data.images import IMAGE_EXTENSIONS, is_hidden, read_member  # noqa: F401 (re-exported)


def shard_files(folder: Path) -> list[Path]:
    """The visible ``.tar`` files of ``folder``, sorted by name."""
    return sorted(p for p in folder.glob("*.tar") if p.is_file() and not is_hidden(p.name))


def index_shards(shards: list[Path]) -> tuple[list[str], np.ndarray, torch.Tensor]:
    """(paths, members [N, 3] int64 of (shard, data offset, size), labels [N]) of every sample.

    Raises ValueError naming the shard and key of a sample without an image or a ``.cls`` label,
    or a file that is not a tar archive.
    """
    members, labels = [], []
    for s, path in enumerate(shards):
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    if not info.isfile() or is_hidden(Path(info.name).name):
                        continue
                    base = Path(info.name)
                    key = str(base.parent / base.name.split(".", 1)[0])
                    ext = "." + base.name.split(".", 1)[1].lower() if "." in base.name else ""
                    groups.setdefault(key, {})[ext] = info
                for key, parts in groups.items():
                    image = next((parts[e] for e in parts if e in IMAGE_EXTENSIONS), None)
                    if image is None or ".cls" not in parts:
                        missing = "an image" if image is None else "a .cls label"
                        raise ValueError(f"webdataset: sample {key!r} in {path} has no {missing}")
                    label_file = tar.extractfile(parts[".cls"])  # a regular file (isfile above)
                    if label_file is None:
                        raise ValueError(
                            f"webdataset: the .cls label of {key!r} in {path} is not a regular file"
                        )
                    raw = label_file.read().decode().strip()
                    try:
                        labels.append(int(raw))
                    except ValueError:
                        raise ValueError(
                            f"webdataset: sample {key!r} in {path}: label {raw!r} in .cls is not an integer"
                        ) from None
                    members.append((s, image.offset_data, image.size))
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"webdataset: {path} is not a readable tar shard: {e}") from e
    table = np.asarray(members, dtype=np.int64).reshape(-1, 3)
    return [str(p) for p in shards], table, torch.tensor(labels, dtype=torch.int64)
