"""Datasets (offline) and the deterministic per-head sharding and batching."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lte.common.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    HeadBatches,
    head_batches,
    head_shard,
    iterate_eval,
    load_dataset,
    own_data_shards,
    read_idx,
    shard_indices,
    stacked_batch,
)

# --- digits --------------------------------------------------------------------------------


def test_digits_shapes_and_normalisation() -> None:
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1438, 1, 8, 8) and ds.test_x.shape == (359, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.task) == (10, 1, 8, "classification")
    assert set(ds.train_y.tolist()) == set(range(10)) == set(ds.test_y.tolist())
    assert abs(ds.train_x.mean().item()) < 1e-4 and abs(ds.train_x.std().item() - 1) < 1e-3
    # stratified: every class gives ~20 % of its samples to test
    assert ds.test_y.bincount().min() >= 35


def test_digits_split_is_seeded() -> None:
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.test_y, c.test_y)


# --- fashion-mnist -----------------------------------------------------------------------

needs_fashion = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist"
)


@needs_fashion
def test_fashion_mnist_loads_the_official_split() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.train_x.dtype == torch.float32
    assert ds.train_y.min() == 0 and ds.train_y.max() == 9 and ds.test_y.max() == 9
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert abs(ds.train_x.mean().item()) < 1e-3 and abs(ds.train_x.std().item() - 1) < 1e-3
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)


@needs_fashion
def test_fashion_mnist_files_are_parsed_once() -> None:
    path = Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz"
    assert read_idx(path, "labels") is read_idx(path, "labels")


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion(root: Path, compress: bool, n_train: int = 6, n_test: int = 4) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{prefix}-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n, 28, 28)), 0x803),
            f"{prefix}-labels-idx1-ubyte": idx_bytes(np.arange(n) % 10, 0x801),
        }
        for name, data in files.items():
            if compress:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_parser_reads_gzip_and_plain_files(tmp_path: Path, compress: bool) -> None:
    write_fake_fashion(tmp_path, compress)
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_x.shape == (4, 1, 28, 28)
    assert ds.train_y.tolist() == [0, 1, 2, 3, 4, 5]


def test_corrupt_idx_files_are_value_errors_naming_the_file(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, compress=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    good = bad.read_bytes()

    bad.write_bytes(b"\x00\x00\x08\x01" + good[4:])  # labels' magic on an images file
    with pytest.raises(ValueError, match=f"corrupt IDX file .*{bad.name}.*bad magic"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))

    bad.write_bytes(good[:-100])  # truncated body
    with pytest.raises(ValueError, match=f"corrupt IDX file .*{bad.name}.*header says"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))

    bad.unlink()
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(good)[:200])  # truncated gzip stream
    with pytest.raises(ValueError, match=f"corrupt IDX file .*{gz.name}"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


# --- imagefolder ---------------------------------------------------------------------------


def write_pngs(folder: Path, count: int, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (10, 12), tuple(min(255, c + i) for c in colour)).save(folder / f"{i}.png")


def test_imagefolder_with_train_and_test_folders(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        write_pngs(tmp_path / split / "cat", n, (200, 10, 10))
        write_pngs(tmp_path / split / "dog", n, (10, 10, 200))
    ds = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=8)
    assert ds.train_x.shape == (6, 3, 8, 8) and ds.test_x.shape == (4, 3, 8, 8)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_y.tolist() == [0, 0, 1, 1]
    assert ds.extras["classes"] == ["cat", "dog"] and ds.num_classes == 2
    # red cats and blue dogs stay apart after normalisation
    assert (ds.train_x[:3, 0] > ds.train_x[3:, 0]).all()
    gray = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=4, grayscale=True)
    assert gray.train_x.shape == (6, 1, 4, 4) and gray.in_channels == 1


def test_imagefolder_single_root_is_split_by_seed(tmp_path: Path) -> None:
    for i, name in enumerate(["a", "b", "c"]):
        write_pngs(tmp_path / name, 5, (40 * i, 0, 0))
    ds = load_dataset("imagefolder", data_dir=str(tmp_path), seed=1)
    assert ds.train_x.shape == (12, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.test_y.tolist() == [0, 1, 2]
    again = load_dataset("imagefolder", data_dir=str(tmp_path), seed=1)
    assert torch.equal(ds.test_x[:], again.test_x[:])


def test_imagefolder_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="pass data_dir"):
        load_dataset("imagefolder")
    with pytest.raises(ValueError, match="no images"):
        load_dataset("imagefolder", data_dir=str(tmp_path))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.png").write_bytes(b"not really a png")
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail, as when Pillow is absent
    with pytest.raises(ImportError, match="pip install pillow"):
        load_dataset("imagefolder", data_dir=str(tmp_path))


# --- synthetic regression ----------------------------------------------------------------


def test_synthetic_regression_has_a_full_rank_target() -> None:
    ds = load_dataset("synthetic-regression")
    w = ds.extras["target_weight"]
    assert w.shape == (64, 64) and torch.linalg.matrix_rank(w.double()) == 64
    assert ds.train_x.shape == (4096, 64) and ds.train_y.shape == (4096, 64) and ds.test_x.shape == (1024, 64)
    assert ds.train_x.dtype == ds.train_y.dtype == torch.float32
    assert (ds.task, ds.num_classes, ds.output_dim) == ("regression", 0, 64)
    torch.testing.assert_close(ds.train_y, ds.train_x @ w.T)
    assert ds.in_channels * ds.image_size**2 == 64  # so build_model("mlp", ...) gets in_features = d_in


def test_synthetic_regression_options_and_seed() -> None:
    ds = load_dataset(
        "synthetic-regression", seed=2, d_in=32, d_out=16, num_train=100, num_test=10, noise_std=0.1
    )
    w = ds.extras["target_weight"]
    assert w.shape == (16, 32) and torch.linalg.matrix_rank(w.double()) == 16
    residual = ds.train_y - ds.train_x @ w.T
    assert 0.05 < residual.std().item() < 0.2
    same = load_dataset(
        "synthetic-regression", seed=2, d_in=32, d_out=16, num_train=100, num_test=10, noise_std=0.1
    )
    other = load_dataset("synthetic-regression", seed=3, d_in=32, d_out=16, num_train=100, num_test=10)
    assert torch.equal(ds.train_y, same.train_y) and not torch.equal(w, other.extras["target_weight"])


def test_unknown_dataset_and_option() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(TypeError):
        load_dataset("digits", grayscale=True)
    assert "fashion-mnist" in DATASET_NAMES


# --- sharding and batching ---------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "num_shards"), [(100, 1), (100, 7), (10, 10), (5, 8)])
def test_shards_partition_the_samples(num_samples: int, num_shards: int) -> None:
    shards = [shard_indices(num_samples, i, num_shards, seed=5) for i in range(num_shards)]
    everything = torch.cat(shards)
    assert sorted(everything.tolist()) == list(range(num_samples))  # disjoint and covering
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
    assert torch.equal(shards[-1], shard_indices(num_samples, num_shards - 1, num_shards, seed=5))
    assert not torch.equal(shard_indices(100, 0, 2, seed=5), shard_indices(100, 0, 2, seed=6))


def test_shard_id_out_of_range() -> None:
    with pytest.raises(ValueError, match="shard_id 4 out of range for 4 shards"):
        shard_indices(10, 4, 4, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        shard_indices(10, -1, 4, seed=0)


def toy(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return x, torch.arange(n)  # y is each row's own index, which makes batches easy to read


def test_batches_are_a_pure_function_of_seed_head_and_step() -> None:
    x, y = toy()
    first = HeadBatches(x, y, head_id=2, num_heads=4, batch_size=8, seed=11)
    walked = [first.batch(step) for step in range(10)]
    fresh = HeadBatches(x, y, head_id=2, num_heads=4, batch_size=8, seed=11)
    for step in (9, 3, 0, 7):  # any order, in a new object (a head resumed in another process)
        bx, by = fresh.batch(step)
        assert torch.equal(bx, walked[step][0]) and torch.equal(by, walked[step][1])
    other_head = HeadBatches(x, y, head_id=1, num_heads=4, batch_size=8, seed=11)
    assert not set(other_head.batch(0)[1].tolist()) & set(first.shard.tolist())


def test_each_epoch_is_a_fresh_permutation_of_the_shard() -> None:
    x, y = toy()
    stream = HeadBatches(x, y, head_id=0, num_heads=4, batch_size=5, seed=0)  # shard of 25: 5 batches/epoch
    epochs = [torch.cat([stream.batch(e * 5 + k)[1] for k in range(5)]) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == sorted(stream.shard.tolist())
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_batches_straddle_epochs_and_wrap_small_shards() -> None:
    x, y = toy(40)
    stream = HeadBatches(x, y, head_id=0, num_heads=4, batch_size=4, seed=0)  # shard of 10
    flat = torch.cat([stream.batch(k)[1] for k in range(5)])  # 20 samples = exactly 2 epochs
    assert sorted(flat[:10].tolist()) == sorted(flat[10:].tolist()) == sorted(stream.shard.tolist())
    assert len(stream.batch(2)[1]) == 4  # positions 8..11 cross the first epoch boundary

    tiny = HeadBatches(x, y, head_id=3, num_heads=4, batch_size=32, seed=0)  # shard of 10 < batch
    bx, by = tiny.batch(0)
    assert bx.shape == (32, 3) and set(by.tolist()) == set(tiny.shard.tolist())
    assert torch.equal(by, HeadBatches(x, y, 3, 4, 32, seed=0).batch(0)[1])


def test_iid_heads_each_draw_from_the_whole_set_as_a_pure_function_of_seed_head_and_step() -> None:
    x, y = toy(40)
    assert head_shard(2, 4, "shard") == (2, 4) and head_shard(2, 4, "iid") == (0, 1)
    with pytest.raises(ValueError, match="head_data must be 'shard' or 'iid', got 'all'"):
        head_shard(0, 4, "all")
    dataset = SimpleNamespace(task="classification", train_x=x, train_y=y)
    streams = [head_batches(dataset, h, 4, batch_size=8, seed=3, head_data="iid") for h in range(4)]
    for stream in streams:  # 5 batches of 8 = one epoch of the whole set, in this head's order
        epoch = torch.cat([stream.batch(k)[1] for k in range(5)])
        assert sorted(epoch.tolist()) == list(range(40))
    orders = [torch.cat([s.batch(k)[1] for k in range(5)]) for s in streams]
    assert all(not torch.equal(orders[0], o) for o in orders[1:])  # each head its own order
    walked = [streams[2].batch(k) for k in range(12)]
    fresh = head_batches(dataset, 2, 4, batch_size=8, seed=3, head_data="iid")  # a resumed head
    for step in (11, 4, 0, 7):
        assert torch.equal(fresh.batch(step)[1], walked[step][1])
    shard = head_batches(dataset, 2, 4, batch_size=8, seed=3)  # the default reads its quarter only
    assert set(torch.cat([shard.batch(k)[1] for k in range(5)]).tolist()) == set(shard.shard.tolist())
    assert len(shard.shard) == 10
    # a worker's own data: split over its heads with shards, all of it for every head with iid
    assert own_data_shards(8, [5, 7], "iid") == [(0, 1), (0, 1)]
    assert own_data_shards(8, [5, 7]) == [(0, 2), (1, 2)]


def test_batching_errors() -> None:
    x, y = toy(3)
    with pytest.raises(ValueError, match="shard is empty"):
        HeadBatches(x, y, head_id=3, num_heads=4, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        HeadBatches(x, y, head_id=4, num_heads=4, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        HeadBatches(x, y, head_id=0, num_heads=1, batch_size=2, seed=0).batch(-1)
    with pytest.raises(ValueError, match="3 samples but y has 2"):
        HeadBatches(x, y[:2], head_id=0, num_heads=1, batch_size=2, seed=0)


def test_stacked_batch_puts_head_i_in_rows_i() -> None:
    x, y = toy()
    bs = 6
    streams = [HeadBatches(x, y, head_id=i, num_heads=3, batch_size=bs, seed=7) for i in range(3)]
    sx, sy = stacked_batch(streams, step=4)
    assert sx.shape == (18, 3) and sy.shape == (18,)
    for i, stream in enumerate(streams):
        bx, by = stream.batch(4)
        assert torch.equal(sx[i * bs : (i + 1) * bs], bx) and torch.equal(sy[i * bs : (i + 1) * bs], by)
    with pytest.raises(ValueError, match="share one batch_size"):
        stacked_batch([streams[0], HeadBatches(x, y, 1, 3, bs + 1, seed=7)], step=0)


def test_iterate_eval_covers_everything_in_order() -> None:
    x, y = toy(10)
    batches = list(iterate_eval(x, y, batch_size=4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
