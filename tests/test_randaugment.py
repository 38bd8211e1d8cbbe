"""RandAugment (common/data/randaugment.py): torchvision's magnitudes, every op doing its work, and the
augmented training batch a pure function of (seed, head, step) wherever it is decoded."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lte.common.data.datasets import HeadBatches, load_dataset, load_job_dataset
from lte.common.data.images import ImageFiles
from lte.common.data.loader import PrefetchedBatches
from lte.common.data.randaugment import (
    DEFAULT_MAGNITUDE,
    RANDAUGMENT_OPS,
    Op,
    apply_op,
    draw_ops,
    op_value,
    rand_augment,
)
from lte.common.job.config import JobConfig
from tests.test_image_data import write_classes

SIGNED = (
    "shear-x",
    "shear-y",
    "translate-x",
    "translate-y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
)


def smooth_image(mode: str, size: int = 32, seed: int = 0) -> Image.Image:
    """A smooth colour field (a blown-up 6x6 noise image): every op has edges, levels and colours to change."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC).convert(mode)


def test_magnitudes_are_torchvisions_table() -> None:
    # torchvision.transforms.RandAugment._augmentation_space(31, (H, W)) at bins 9 and 30
    at9 = {name: op_value(name, 9, 224, 160) for name in RANDAUGMENT_OPS}
    assert at9["shear-x"] == at9["shear-y"] == pytest.approx(0.09)
    assert at9["translate-x"] == pytest.approx(150 / 331 * 224 * 0.3)  # 30.45 px, applied as 30
    assert at9["translate-y"] == pytest.approx(150 / 331 * 160 * 0.3)
    assert at9["rotate"] == pytest.approx(9.0)
    assert [at9[n] for n in ("brightness", "color", "contrast", "sharpness")] == pytest.approx([0.27] * 4)
    assert (at9["posterize"], at9["solarize"]) == (7.0, pytest.approx(178.5))
    assert (op_value("posterize", 30, 8, 8), op_value("solarize", 30, 8, 8)) == (4.0, 0.0)
    assert [op_value("posterize", m, 8, 8) for m in (0, 3, 4, 11, 12, 18, 19, 26, 27)] == [
        8.0, 8.0, 7.0, 7.0, 6.0, 6.0, 5.0, 5.0, 4.0,
    ]  # fmt: skip
    assert all(op_value(n, 0, 224, 224) == 0.0 for n in SIGNED)
    for bad in (-1, 31):
        with pytest.raises(ValueError, match=r"magnitude must be in \[0, 30\]"):
            op_value("rotate", bad, 8, 8)
    with pytest.raises(ValueError, match="unknown RandAugment op 'cutout'"):
        op_value("cutout", 9, 8, 8)


# every op but identity, on RGB and grayscale; saturation ("color") has nothing to change on grayscale
CHANGING = [(n, m) for m in ("RGB", "L") for n in RANDAUGMENT_OPS[1:] if (n, m) != ("color", "L")]


@pytest.mark.parametrize("name, mode", CHANGING, ids=[f"{n}-{m}" for n, m in CHANGING])
def test_every_op_changes_the_image_and_keeps_size_mode_and_range(name: str, mode: str) -> None:
    im = smooth_image(mode)
    before = np.asarray(im)
    value = op_value(name, DEFAULT_MAGNITUDE, im.width, im.height)
    for signed in (value, -value) if name in SIGNED else (value,):
        out = apply_op(im, Op(name, signed))
        after = np.asarray(out)
        assert out.mode == mode and out.size == im.size
        assert after.dtype == np.uint8 and after.shape == before.shape
        assert not np.array_equal(after, before), (name, signed)
        assert np.array_equal(np.asarray(im), before)  # the input is left as it was
    if name in SIGNED:  # magnitude 0 is the identity of every signed op
        assert np.array_equal(np.asarray(apply_op(im, Op(name, 0.0))), before)


def test_point_ops_follow_their_definitions_on_every_grey_level() -> None:
    levels = np.arange(256, dtype=np.uint8)
    ramp = Image.fromarray(levels.reshape(16, 16), "L")

    def out(name: str, magnitude: int) -> np.ndarray:
        return np.asarray(apply_op(ramp, Op(name, op_value(name, magnitude, 16, 16)))).reshape(-1)

    assert np.array_equal(out("solarize", 9), np.where(levels >= 178.5, 255 - levels, levels))
    assert np.array_equal(out("posterize", 9), levels & 0xFE)  # 7 bits kept
    assert np.array_equal(out("posterize", 30), levels & 0xF0)  # 4 bits kept
    shifted = np.asarray(apply_op(smooth_image("L", 16), Op("translate-x", 3.7)))
    assert np.array_equal(shifted[:, 3:], np.asarray(smooth_image("L", 16))[:, :-3])  # 3 whole pixels
    assert not shifted[:, :3].any()  # what the shift uncovers is filled with 0


def test_ops_are_drawn_uniformly_with_balanced_signs() -> None:
    ops = draw_ops(14_000, DEFAULT_MAGNITUDE, 32, 32, np.random.default_rng(0))
    counts = Counter(op.name for op in ops)
    assert set(counts) == set(RANDAUGMENT_OPS)
    assert all(abs(c - 1000) < 4 * 1000**0.5 for c in counts.values()), counts  # binomial sd ~ 30
    negative = sum(op.value < 0 for op in ops if op.name == "rotate")
    assert abs(negative - counts["rotate"] / 2) < 4 * (counts["rotate"] / 4) ** 0.5
    assert all(op.value >= 0 for op in ops if op.name not in SIGNED)
    same = draw_ops(20, 9, 32, 32, np.random.default_rng(5))
    assert same == draw_ops(20, 9, 32, 32, np.random.default_rng(5))
    assert same != draw_ops(20, 9, 32, 32, np.random.default_rng(6))
    im = smooth_image("RGB")
    assert rand_augment(im, 0, 9, np.random.default_rng(0)) is im
    assert apply_op(im, Op("identity", 0.0)) is im
    gray = smooth_image("L")
    assert np.array_equal(np.asarray(apply_op(gray, Op("color", 0.27))), np.asarray(gray))


# --- in the data pipeline ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ra")
    write_classes(root, {"a": 8, "b": 8}, size=24)
    return root


def test_augmented_batches_are_a_function_of_seed_head_and_step(folder: Path) -> None:
    ra = load_dataset("imagefolder", str(folder), image_size=16, test_fraction=0.25, randaugment=(2, 9))
    plain = load_dataset("imagefolder", str(folder), image_size=16, test_fraction=0.25)
    assert ra.train_x.randaugment == (2, 9) and ra.test_x.randaugment == (
        0,
        0,
    )  # evaluation is never augmented
    assert torch.equal(ra.test_x[:], plain.test_x[:])

    def stream(ds, head: int = 0, seed: int = 0) -> HeadBatches:
        return HeadBatches(ds.train_x, ds.train_y, head, 2, 4, seed)

    a, b = stream(ra), stream(ra)
    for step in (5, 0, 3):  # any order, any instance: the same pixels
        x = a.batch(step)[0]
        assert torch.equal(x, b.batch(step)[0])
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(stream(ra, head=1).batch(0)[0], a.batch(0)[0])
    assert not torch.equal(stream(ra, seed=1).batch(0)[0], a.batch(0)[0])
    assert torch.equal(a.indices(0), stream(plain).indices(0))  # same samples, same crops ...
    assert not torch.equal(a.batch(0)[0], stream(plain).batch(0)[0])  # ... then RandAugment on top
    # with --augment none, RandAugment alone still makes the training view differ from the eval view
    bare = load_dataset(
        "imagefolder", str(folder), image_size=16, test_fraction=0.25, augment="none", randaugment=(2, 9)
    )
    s = stream(bare)
    assert not torch.equal(s.batch(0)[0], bare.train_x.load(s.indices(0).tolist()))


@pytest.mark.process
def test_loader_processes_give_the_in_process_randaugment_batches(folder: Path) -> None:
    ds = load_dataset("imagefolder", str(folder), image_size=12, test_fraction=0.25, randaugment=(3, 15))
    streams = [HeadBatches(ds.train_x, ds.train_y, h, 2, 3, 7) for h in (0, 1)]
    direct, loaded = PrefetchedBatches(streams, 0, horizon=6), PrefetchedBatches(streams, 1, horizon=6)
    try:
        for steps in ([0, 0], [1, 1], [2, 2]):
            assert torch.equal(direct.get(steps)[0], loaded.get(steps)[0])
    finally:
        loaded.close()


def test_the_job_carries_randaugment_to_the_dataset_and_refuses_it_elsewhere(folder: Path) -> None:
    job = JobConfig(dataset="imagefolder", randaugment_ops=2, randaugment_magnitude=12, image_size=16)
    assert load_job_dataset(job, str(folder)).train_x.randaugment == (2, 12)
    with pytest.raises(ValueError, match="--randaugment-ops 2: RandAugment applies to image folders"):
        load_job_dataset(JobConfig(dataset="digits", randaugment_ops=2))
    with pytest.raises(ValueError, match=r"--randaugment-magnitude 31: must be in \[0, 30\]"):
        JobConfig(randaugment_magnitude=31)
    with pytest.raises(ValueError, match=r"--randaugment-ops -1: must be in \[0, 14\]"):
        JobConfig(randaugment_ops=-1)
    with pytest.raises(ValueError, match="randaugment"):
        ImageFiles([], 8, 3, randaugment=(1, 40))
