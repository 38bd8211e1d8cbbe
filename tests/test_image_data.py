"""Image folders as users bring them: streamed from disk, bad inputs handled or refused in one line,
and batches (with their augmentation) a pure function of (seed, head, step)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lte.common.data.datasets import HeadBatches, eval_subset, load_dataset, load_job_dataset, own_data_shards
from lte.common.data.images import BadImageError, ImageFiles, decode_image, random_resized_box
from lte.common.data.loader import PrefetchedBatches, eval_batches
from lte.common.job.config import JobConfig, ServerSettings
from lte.common.job.trainer import LocalTrainer, evaluate
from lte.server.run import local_data_args

# --- fixtures: the kinds of folders users have, generated here --------------------------------


def noise(seed: int, size: int = 16) -> Image.Image:
    r = np.random.default_rng(seed)
    return Image.fromarray(r.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def write_classes(root: Path, classes: dict[str, int], size: int = 16) -> None:
    """Class folders with images in several PIL modes (RGB, L, RGBA, palette, CMYK JPEG, 1-bit)."""
    for ci, (name, count) in enumerate(classes.items()):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            im = noise(100 * ci + i, size)
            kind = i % 6
            if kind == 0:
                im.save(d / f"{i}.png")
            elif kind == 1:
                im.convert("L").save(d / f"{i}.png")
            elif kind == 2:
                im.convert("RGBA").save(d / f"{i}.png")
            elif kind == 3:
                im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(
                    d / f"{i}.png", transparency=0
                )
            elif kind == 4:
                im.convert("CMYK").save(d / f"{i}.jpg")
            else:
                im.convert("1").save(d / f"{i}.png")


def job_of(data, **overrides) -> JobConfig:
    base = dict(
        model="mlp", dataset="imagefolder", heads=2, rank=4, alpha=8.0, steps=4, merge_every=2, batch_size=4
    )
    base.update(overrides)
    return JobConfig(**base).with_dataset(data)


# --- decoding ------------------------------------------------------------------------------------


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp16 = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp16).save(tmp_path / "deep.png")
    Image.fromarray((ramp16 >> 8).astype(np.uint8), "L").save(tmp_path / "flat.png")
    deep = np.asarray(decode_image(tmp_path / "deep.png", 1), dtype=np.int32)
    flat = np.asarray(decode_image(tmp_path / "flat.png", 1), dtype=np.int32)
    assert np.abs(deep - flat).max() <= 1  # the same picture, not white wherever the pixel is non-zero
    assert deep.min() == 0 and deep.max() == 255 and len(np.unique(deep)) == 16


def test_every_pil_mode_decodes_to_the_asked_channels(tmp_path: Path) -> None:
    write_classes(tmp_path, {"a": 6})
    for f in sorted((tmp_path / "a").iterdir()):
        assert decode_image(f, 3).mode == "RGB" and decode_image(f, 1).mode == "L"


def test_hidden_folders_and_stray_files_are_ignored(tmp_path: Path) -> None:
    write_classes(tmp_path, {"a": 6, "b": 6})
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "a" / "notes.txt").write_text("labels by hand")
    shutil.copytree(tmp_path / "a", tmp_path / ".ipynb_checkpoints")
    (tmp_path / "empty").mkdir()
    ds = load_dataset("imagefolder", str(tmp_path), image_size=8)
    assert ds.extras["classes"] == ["a", "b"] and ds.num_classes == 2
    assert len(ds.train_y) + len(ds.test_y) == 12
    files = list(ds.train_x.files) + list(ds.test_x.files)
    assert not any(".ipynb_checkpoints" in f or f.endswith((".txt", ".DS_Store")) for f in files)


@pytest.mark.parametrize("kind", ["truncated", "notimage"])
def test_a_damaged_file_is_named_or_skipped_and_counted(tmp_path: Path, kind: str) -> None:
    write_classes(tmp_path, {"a": 5})
    bad = tmp_path / "a" / "9_bad.jpg"
    if kind == "truncated":
        good = tmp_path / "a" / "4.jpg"
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        bad.write_text("<html><body>403 Forbidden</body></html>\n")
    files = sorted((tmp_path / "a").iterdir())
    strict = ImageFiles(files, 8, 3)
    with pytest.raises(BadImageError, match="damaged image .*9_bad.jpg.*--skip-bad-images"):
        strict[:]
    lenient = ImageFiles(files, 8, 3, skip_bad=True)
    x = lenient[:]
    assert x.shape == (6, 3, 8, 8) and lenient.bad_files == {str(bad)}
    assert torch.equal(x[-1], lenient[0])  # replaced by the next file that decodes (wrapping round)


@pytest.mark.process
def test_a_damaged_file_stops_lte_sim_with_one_line(tmp_path: Path) -> None:
    write_classes(tmp_path, {"a": 6, "b": 6})
    (tmp_path / "b" / "7.jpg").write_text("<html>not an image</html>")
    cmd = [sys.executable, "-m", "lte.commands.sim", "--dataset", "imagefolder", "--data-dir", str(tmp_path),
           "--image-size", "8", "--heads", "2", "--steps", "10", "--batch-size", "8", "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("lte-sim: error: damaged image ")
    assert "Traceback" not in run.stderr
    ok = subprocess.run([*cmd, "--skip-bad-images", "--json"], capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert "7.jpg" in ok.stderr


# --- a worker's own data, mapped to the job ------------------------------------------------------


def test_own_folders_are_mapped_to_the_job_by_class_name(tmp_path: Path, caplog) -> None:
    write_classes(tmp_path / "job", {"a": 6, "b": 6, "c": 6})
    write_classes(tmp_path / "skip", {"a": 4, "c": 4})
    (tmp_path / "skip" / "b").mkdir()
    job = job_of(load_dataset("imagefolder", str(tmp_path / "job"), image_size=8))
    assert job.classes == ("a", "b", "c")
    own = load_job_dataset(job, own_data=str(tmp_path / "skip"))
    assert own.extras["own_data"] and own.num_classes == 3
    labels = set(own.train_y.tolist()) | set(own.test_y.tolist())
    assert labels == {0, 2}  # c is the job's class 2 even with b empty here
    assert "['b']" in caplog.text  # the missing class is warned about

    write_classes(tmp_path / "extra", {"a": 3, "d": 3})
    with pytest.raises(ValueError, match=r"class folder\(s\) \['d'\] .* not among the job's classes"):
        load_job_dataset(job, own_data=str(tmp_path / "extra"))


def test_own_data_takes_the_jobs_channels_and_size(tmp_path: Path) -> None:
    write_classes(tmp_path / "job", {"a": 4, "b": 4})
    gray_job = job_of(load_dataset("imagefolder", str(tmp_path / "job"), image_size=8, grayscale=True))
    write_classes(tmp_path / "rgb", {"a": 4, "b": 4}, size=20)
    own = load_job_dataset(gray_job, own_data=str(tmp_path / "rgb"))
    assert own.train_x[:].shape[1:] == (1, 8, 8)


def test_a_worker_with_fewer_images_than_heads_trains_them_all(tmp_path: Path) -> None:
    write_classes(tmp_path / "job", {"a": 6, "b": 6})
    job = job_of(load_dataset("imagefolder", str(tmp_path / "job"), image_size=8), heads=8)
    write_classes(tmp_path / "tiny", {"a": 2, "b": 2})
    own = load_job_dataset(job, own_data=str(tmp_path / "tiny"))  # 3 train images, 1 test
    assert own_data_shards(3, [0, 1, 2, 3]) == [(0, 1)] * 4
    assert own_data_shards(8, [5, 7]) == [(0, 2), (1, 2)]
    trainer = LocalTrainer(job, list(range(8)), own)
    stats = trainer.train_round()
    assert stats.steps == 2 and np.isfinite(stats.train_loss)


# --- --image-size on every loader, empty splits -------------------------------------------------


def test_image_size_reaches_the_built_in_sets_or_is_refused() -> None:
    job = JobConfig(model="mlp", dataset="digits", image_size=16)
    ds = load_job_dataset(job)
    assert ds.image_size == 16 and ds.train_x[:5].shape == (5, 1, 16, 16) and ds.test_x.shape[-1] == 16
    trainer = LocalTrainer(job.with_dataset(ds), [0], ds)
    assert np.isfinite(trainer.train_round(2).train_loss)
    with pytest.raises(ValueError, match="synthetic-regression has no images"):
        load_job_dataset(JobConfig(dataset="synthetic-regression", image_size=16))
    with pytest.raises(ValueError, match="augmentations apply to image folders"):
        load_job_dataset(JobConfig(dataset="digits", augment="crop-flip"))


def test_an_empty_test_split_gives_null_metrics(tmp_path: Path, caplog) -> None:
    write_classes(tmp_path / "train", {"a": 3, "b": 3})
    (tmp_path / "val" / "a").mkdir(parents=True)
    ds = load_dataset("imagefolder", str(tmp_path), image_size=8)
    job = job_of(ds)
    result = evaluate(LocalTrainer(job, [0, 1], ds).model, ds)
    assert result == {"test_loss": None, "test_accuracy": None}
    assert "no samples" in caplog.text


def test_local_workers_get_the_data_options() -> None:
    settings = ServerSettings(data_dir="/data/x", skip_bad_images=True, loader_workers=3)
    assert local_data_args(settings) == [
        "--data-dir",
        "/data/x",
        "--skip-bad-images",
        "--loader-workers",
        "3",
    ]
    assert local_data_args(ServerSettings()) == []


# --- determinism of streams and augmentations ----------------------------------------------------


def test_augmented_batches_are_a_function_of_seed_head_and_step(tmp_path: Path) -> None:
    write_classes(tmp_path, {"a": 8, "b": 8}, size=24)
    ds = load_dataset("imagefolder", str(tmp_path), image_size=8, test_fraction=0.25)
    assert ds.extras["augment"] == "crop-flip"

    def stream(head: int, seed: int = 0) -> HeadBatches:
        return HeadBatches(ds.train_x, ds.train_y, head, 2, 4, seed)

    a, b = stream(0), stream(0)
    for step in (0, 3, 7):  # any order, any instance: the same pixels
        assert torch.equal(a.batch(step)[0], b.batch(step)[0])
    assert not torch.equal(a.batch(0)[0], a.batch(2)[0])  # epoch 1 revisits the shard with new crops
    assert not torch.equal(stream(0, seed=1).batch(0)[0], a.batch(0)[0])
    eval_view = ds.train_x.load(a.indices(0).tolist())
    assert not torch.equal(a.batch(0)[0], eval_view)  # training batches are augmented
    rng_boxes = {random_resized_box(100, 60, np.random.default_rng(s)) for s in range(50)}
    assert len(rng_boxes) == 50 and all(0 <= l < r <= 100 and 0 <= t < b <= 60 for l, t, r, b in rng_boxes)


@pytest.mark.process
def test_loader_processes_give_exactly_the_in_process_batches(tmp_path: Path) -> None:
    write_classes(tmp_path, {"a": 6, "b": 6}, size=20)
    ds = load_dataset("imagefolder", str(tmp_path), image_size=8, test_fraction=0.25)
    streams = [HeadBatches(ds.train_x, ds.train_y, h, 2, 3, 0) for h in (0, 1)]
    direct = PrefetchedBatches(streams, 0, horizon=10)
    loaded = PrefetchedBatches(streams, 1, horizon=10)
    try:
        for steps in ([0, 0], [1, 1], [2, 2], [5, 4], [6, 5]):  # a jump restarts the loader process
            x0, y0 = direct.get(steps)
            x1, y1 = loaded.get(steps)
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    finally:
        loaded.close()
    batches = list(eval_batches(ds.test_x, ds.test_y, 2, workers=1))
    assert torch.equal(torch.cat([x for x, _ in batches]), ds.test_x[:])


def test_eval_samples_is_a_fixed_class_balanced_subset() -> None:
    ds = load_dataset("digits", seed=0)
    sub = eval_subset(ds, 50, seed=0)
    assert len(sub.test_y) == 50 and sub.test_y.bincount().tolist() == [5] * 10
    assert torch.equal(sub.test_x, eval_subset(ds, 50, seed=0).test_x)
    assert eval_subset(ds, 0, seed=0) is ds


# --- a real server: local workers get --data-dir; the model is exported after a failed evaluation -


@pytest.mark.process
def test_local_workers_stream_the_servers_folder_and_export_survives_a_failed_eval(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_classes(data / "train", {"a": 8, "b": 8})
    write_classes(data / "val", {"a": 2, "b": 2})
    (data / "val" / "b" / "9.jpg").write_text("<html>not an image</html>")  # breaks the final evaluation
    cmd = [
        sys.executable, "-m", "lte.server.cli", "--model", "mlp", "--dataset", "imagefolder", "--data-dir", str(data),
        "--image-size", "8", "--heads", "2", "--steps", "4", "--merge-every", "2", "--batch-size", "4",
        "--local-workers", "1", "--loader-workers", "0", "--port", "0", "--dashboard-port", "-1",
        "--eval-every", "0", "--out", str(tmp_path / "run"), "--json", "--quiet",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    # the model is saved, and a job with no successful evaluation at all is not a success (issue 24)
    assert run.returncode == 1, run.stderr + (tmp_path / "run" / "worker-0.log").read_text()
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["version"] == 2 and summary["test_loss"] is None
    assert Path(summary["model"]).is_file()
    assert "final evaluation failed" in run.stderr and "9.jpg" in run.stderr
    assert "no evaluation succeeded in this job" in run.stderr.splitlines()[-1]


@pytest.mark.process
@pytest.mark.server
def test_sync_over_the_network_on_a_streamed_augmented_folder_equals_the_emulator(tmp_path: Path) -> None:
    from lte.commands.sim import run_lte
    from lte.server.coordinator import Coordinator
    from lte.server.grpc_server import ParameterServer
    from tests.cluster import worker_processes

    data = tmp_path / "data"
    write_classes(data, {"a": 10, "b": 10, "c": 10}, size=20)
    ds = load_dataset("imagefolder", str(data), image_size=8)
    job = job_of(
        ds,
        heads=2,
        steps=4,
        merge_every=2,
        uplink="fp32",
        quant="none",
        mixup=0.8,
        cutmix=1.0,
        label_smoothing=0.1,
        randaugment_ops=2,
        randaugment_magnitude=9,
    )
    assert job.augment == "crop-flip"
    ds = load_job_dataset(job, str(data))  # as lte-server and lte-sim load it: RandAugment from the job
    assert ds.train_x.randaugment == (2, 9)
    expected = run_lte(job, ds, workers=2).master
    server = ParameterServer(Coordinator(job, ds, heads_per_worker=1), host="127.0.0.1", port=0).start()
    try:
        args = ["--quiet", "--max-heads", "1", "--data-dir", str(data), "--loader-workers", "1"]
        with worker_processes(server.address, [args] * 2, log_dir=tmp_path) as procs:
            assert server.wait_done(timeout=240), [p.poll() for p in procs]
        got = server.coordinator.plain_state()
    finally:
        server.stop(grace=0.5)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.process
@pytest.mark.server
def test_a_worker_whose_folders_do_not_fit_the_job_stops_with_one_line(tmp_path: Path) -> None:
    from lte.server.coordinator import Coordinator
    from lte.server.grpc_server import ParameterServer
    from tests.cluster import worker_processes

    write_classes(tmp_path / "job", {"a": 6, "b": 6})
    write_classes(tmp_path / "extra", {"a": 4, "b": 4, "z": 4})
    ds = load_dataset("imagefolder", str(tmp_path / "job"), image_size=8)
    server = ParameterServer(Coordinator(job_of(ds), ds), host="127.0.0.1", port=0).start()
    try:
        with worker_processes(
            server.address, [["--data", str(tmp_path / "extra")]], log_dir=tmp_path
        ) as procs:
            assert procs[0].wait(timeout=240) == 2
        log = (tmp_path / "worker-0.log").read_text()
        assert "lte-worker: error: imagefolder: class folder(s) ['z']" in log and "Traceback" not in log
        workers = server.coordinator.status()["workers"]  # heads handed back, the reason on the dashboard
        assert all(w["state"] == "failed" and "class folder(s) ['z']" in w["failure"] for w in workers)
    finally:
        server.stop(grace=0.5)


# --- WebDataset shards ----------------------------------------------------------------------------


def png(im: Image.Image) -> tuple[bytes, str]:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue(), "png"


def write_shards(folder: Path, samples: list[tuple[tuple[bytes, str], int]], per_shard: int) -> None:
    """WebDataset shards of (encoded image, extension) and label samples, written by webdataset.TarWriter."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(samples), per_shard):
        with wds.TarWriter(str(folder / f"part-{s // per_shard:04d}.tar")) as sink:
            for k, ((data, ext), label) in enumerate(samples[s : s + per_shard], start=s):
                sink.write({"__key__": f"{k:06d}", ext: data, "cls": str(label).encode()})


def test_webdataset_shards_give_the_same_samples_as_the_folder(tmp_path: Path) -> None:
    write_classes(tmp_path / "folder" / "train", {"cat": 5, "dog": 5})
    write_classes(tmp_path / "folder" / "val", {"cat": 2, "dog": 2})
    for split in ("train", "val"):
        samples = [
            ((f.read_bytes(), f.suffix[1:]), label)
            for label, c in enumerate(("cat", "dog"))
            for f in sorted((tmp_path / "folder" / split / c).iterdir())
        ]
        write_shards(tmp_path / "shards" / split, samples, per_shard=3)
    (tmp_path / "shards" / "classes.txt").write_text("cat\ndog\n")
    folder = load_dataset("imagefolder", str(tmp_path / "folder"), image_size=8)
    shards = load_dataset("webdataset", str(tmp_path / "shards"), image_size=8)
    assert len(list((tmp_path / "shards" / "train").glob("*.tar"))) == 4
    assert shards.extras["classes"] == ["cat", "dog"] and torch.equal(shards.train_y, folder.train_y)
    assert torch.equal(shards.train_x[:], folder.train_x[:]) and torch.equal(
        shards.test_x[:], folder.test_x[:]
    )
    a = HeadBatches(shards.train_x, shards.train_y, 1, 2, 4, 0)
    b = HeadBatches(folder.train_x, folder.train_y, 1, 2, 4, 0)
    assert torch.equal(a.batch(3)[0], b.batch(3)[0])  # same augmentation, whatever the storage

    job = job_of(shards, dataset="webdataset")
    write_shards(tmp_path / "own", [(png(noise(i)), 0) for i in range(4)], per_shard=2)
    (tmp_path / "own" / "classes.txt").write_text("dog\n")  # this worker's label 0 is the job's "dog"
    own = load_job_dataset(job, own_data=str(tmp_path / "own"))
    assert own.name == "webdataset" and set(own.train_y.tolist()) | set(own.test_y.tolist()) == {1}


def test_bad_shards_are_named(tmp_path: Path) -> None:
    import io
    import tarfile

    write_shards(tmp_path / "ok", [(png(noise(i)), i % 2) for i in range(6)], per_shard=6)
    with tarfile.open(tmp_path / "ok" / "part-0001.tar", "w") as tar:  # a sample whose image is HTML
        for name, data in (("000009.png", b"<html>403</html>"), ("000009.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BadImageError, match=r"damaged image .*part-0001.tar@\d+: not an image"):
        load_dataset("webdataset", str(tmp_path / "ok"), image_size=8)  # the stats sample reads every file
    ds = load_dataset("webdataset", str(tmp_path / "ok"), image_size=8, skip_bad_images=True)
    assert len(ds.train_y) + len(ds.test_y) == 7 and len(ds.train_x.bad_files | ds.test_x.bad_files) <= 1
    (tmp_path / "nolabel").mkdir()
    with tarfile.open(tmp_path / "nolabel" / "a.tar", "w") as tar:
        info = tarfile.TarInfo("000001.png")
        data = (tmp_path / "ok" / "part-0000.tar").read_bytes()[:0] or b"x"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"sample '000001' in .*a.tar has no a .cls label"):
        load_dataset("webdataset", str(tmp_path / "nolabel"))
    (tmp_path / "nottar").mkdir()
    (tmp_path / "nottar" / "x.tar").write_text("hello")
    with pytest.raises(ValueError, match="x.tar is not a readable tar shard"):
        load_dataset("webdataset", str(tmp_path / "nottar"))


def test_a_job_with_class_names_survives_a_json_round_trip_as_a_checkpoint_saves_it() -> None:
    job = JobConfig(dataset="imagefolder", classes=("cat", "dog"), augment="crop-flip")
    saved = json.loads(json.dumps(job.to_dict()))
    assert saved == job.to_dict() and JobConfig(**saved) == job
