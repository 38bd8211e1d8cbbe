"""Issue 25: ``lte-server --print-config`` prints the resolved job (no ``image_size = 0`` or
``patch_size = 0`` placeholder), read from the data's metadata only, and it is exactly the
config.toml that a real start writes; issue 20: the server settings are one typed ``ServerSettings``."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lte.common.data.datasets import DatasetMetadata, dataset_metadata, load_job_dataset
from lte.common.data.text import ByteTokenizer, write_token_files
from lte.common.job.checks import ConfigError
from lte.common.job.config import JobConfig, ServerSettings
from lte.server.cli import job_for_data, main
from lte.server.run import stop_processes
from tests.faults import wait_until

BOUND_S = 240  # a loaded 2-core machine starts a torch process in 10-30 s


def image_tree(root: Path, counts: dict[str, int]) -> Path:
    """``root/<class>/<i>.png``: small RGB noise images, ``counts[class]`` of each."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def shards(root: Path, labels: list[int]) -> Path:
    """One WebDataset shard of noise PNGs with the given labels (no classes.txt)."""
    import io

    import webdataset as wds

    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(root / "part-0000.tar")) as sink:
        for k, label in enumerate(labels):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"{k:06d}", "png": buf.getvalue(), "cls": str(label).encode()})
    return root


def token_folder(folder: Path) -> Path:
    text = "In the beginning God created the heaven and the earth. And the earth was without form. " * 40
    write_token_files(folder, [text], ByteTokenizer())
    return folder


DATASETS = {  # name: (job fields, data folder maker)
    "digits": ({"model": "vit-micro", "dataset": "digits"}, None),
    "fashion-mnist": ({"model": "mlp", "dataset": "fashion-mnist", "image_size": 14}, None),
    "synthetic-regression": ({"model": "mlp", "dataset": "synthetic-regression"}, None),
    "imagefolder": (
        {"model": "vit-micro", "dataset": "imagefolder", "in_channels": 1},
        lambda tmp: image_tree(tmp / "images", {"cat": 3, "dog": 2, "empty": 0}),
    ),
    "webdataset": (
        {"model": "mlp", "dataset": "webdataset"},
        lambda tmp: shards(tmp / "shards", [0, 2, 1, 2]),
    ),
    "text": ({"model": "gpt-micro", "dataset": "text"}, lambda tmp: token_folder(tmp / "tokens")),
}


@pytest.mark.parametrize("name", DATASETS)
def test_the_metadata_resolves_the_job_as_the_loaded_dataset_does(name, tmp_path):
    values, make = DATASETS[name]
    job = JobConfig(**values)
    data_dir = str(make(tmp_path)) if make else None
    described = dataset_metadata(job, data_dir)
    loaded = load_job_dataset(job, data_dir)
    assert job_for_data(job, described) == job_for_data(job, loaded)
    resolved = job_for_data(job, described)
    assert resolved.num_classes and resolved.task  # nothing left for the data to decide
    if name != "text":
        assert isinstance(described, DatasetMetadata) and resolved.image_size and resolved.in_channels


def test_the_metadata_of_images_reads_no_image(tmp_path):
    """An image folder's metadata comes from its folder names: files that do not decode are not read."""
    root = tmp_path / "images"
    for name in ("b", "a"):
        (root / name).mkdir(parents=True)
        (root / name / "0.png").write_bytes(b"not a png")
    meta = dataset_metadata(JobConfig(dataset="imagefolder"), str(root))
    assert meta.extras["classes"] == ["a", "b"] and (meta.image_size, meta.in_channels) == (32, 3)


def test_the_metadata_refuses_what_loading_refuses(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dataset_metadata(JobConfig(dataset="imagefolder"), str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--augment crop-flip"):
        dataset_metadata(JobConfig(dataset="digits", augment="crop-flip"))
    with pytest.raises(ValueError, match="--image-size 28: token data"):
        dataset_metadata(JobConfig(model="gpt-micro", dataset="text", image_size=28), str(tmp_path))


def print_config(capsys, *argv: str) -> tuple[str, dict]:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    return text, tomllib.loads(text)


def test_print_config_of_a_missing_data_folder_is_one_line_exit_2(tmp_path, capsys):
    code = main(["--dataset", "text", "--model", "gpt-micro", "--data-dir", str(tmp_path), "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lte-server: error: ") and err.count("\n") == 1
    assert "meta.json" in err and "Traceback" not in err


FAMILIES = {  # the job's flags: mlp, a ViT and a GPT
    "mlp": lambda tmp: ["--model", "mlp", "--dataset", "digits"],
    "vit": lambda tmp: ["--model", "vit-micro", "--dataset", "digits"],
    "gpt": lambda tmp: [
        "--model",
        "gpt-micro",
        "--dataset",
        "text",
        "--data-dir",
        str(token_folder(tmp / "kjv")),
    ],
}
JOB = [
    "--heads",
    "2",
    "--rank",
    "4",
    "--steps",
    "40",
    "--port",
    "0",
    "--dashboard-port",
    "-1",
    "--local-workers",
    "0",
]


@pytest.mark.process
@pytest.mark.parametrize("family", FAMILIES)
def test_print_config_is_the_config_toml_a_start_writes_and_starts_the_same_job(family, tmp_path, capsys):
    run = tmp_path / "run"
    text, printed = print_config(capsys, *FAMILIES[family](tmp_path), *JOB, "--out", str(run))
    # no placeholder: what the data decides, the zoo's patch size, the 5 % warm-up, the automatic cadences
    assert printed["warmup_steps"] == 2 and printed["eval_every"] == 1 and printed["checkpoint_every"] == 1
    assert printed["num_classes"] == (10 if family != "gpt" else 256) and printed["task"]
    if family == "gpt":
        assert printed["context"] == 128 and printed["tokenizer"] == "bytes" and printed["image_size"] == 0
    else:
        assert (printed["image_size"], printed["in_channels"]) == (8, 1)
    assert printed.get("patch_size") == (2 if family == "vit" else None)
    # the printed TOML, re-read as --config, starts the same job: its config.toml is the printed text
    config = tmp_path / "printed.toml"
    config.write_text(text)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "lte-server"), "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_until(
            lambda: "serving lte.v1.ParameterServer" in log.read_text(), BOUND_S, "the server to serve"
        )
    finally:
        stop_processes([proc], timeout=BOUND_S)
    assert (run / "config.toml").read_text() == text, log.read_text()[-3000:]


def test_server_settings_check_each_value_and_name_its_option():
    assert ServerSettings().port == 50051 and ServerSettings().public()["token"] is None
    assert ServerSettings(token="a-secret-of-sufficient-length").public()["token"] == "<set>"
    assert "token" not in ServerSettings(token="a-secret-of-sufficient-length").without_secrets()
    cases = {
        "port": (70000, "--port 70000: must be in [0, 65535]"),
        "lease_timeout": (0.0, "--lease-timeout 0.0: must be > 0"),
        "linger": (float("inf"), "--linger inf: must be a finite number"),
        "update_guard": ("bogus", "--update-guard 'bogus': must be one of refuse, clip, off"),
        "rpc_threads": (1, "--rpc-threads 1: must be >= 2"),
        "host": (" ", "--host ' ': must not be empty"),
        "heartbeat_interval": (30.0, "--heartbeat-interval 30: must be below --lease-timeout 30"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            ServerSettings(**{key: value})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerSettings().port = 1  # type: ignore[misc]


def test_resolved_settings_fill_the_placeholders_as_the_server_runs_them():
    job = JobConfig(heads=5, steps=200, merge_every=10)  # 20 rounds per head
    resolved = ServerSettings(local_workers=2).resolved(job)
    assert (resolved.heads_per_worker, resolved.eval_every, resolved.checkpoint_every) == (3, 2, 2)
    kept = ServerSettings(heads_per_worker=1, eval_every=0, checkpoint_every=7).resolved(job)
    assert (kept.heads_per_worker, kept.eval_every, kept.checkpoint_every) == (1, 0, 7)
    assert ServerSettings().resolved(job).heads_per_worker == 0  # no bound without local workers


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval-samples", "-1"], "--eval-samples -1: must be >= 0"),
        (["--loader-workers", "-5"], "--loader-workers -5: must be >= -1"),
    ],
)
def test_print_config_refuses_the_counts_a_start_refuses(flags, message, capsys):
    # --eval-samples -1 printed a config that a start refuses; --loader-workers -5 started as -1 (the default)
    code = main(["--model", "mlp", "--dataset", "digits", *flags, "--print-config"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out[:300]
    assert captured.err.startswith("lte-server: error: " + message) and captured.err.count("\n") == 1


def test_print_config_with_resume_refuses_what_the_resumed_start_refuses(tmp_path, capsys):
    # --print-config --resume printed a config (exit 0) for a folder without a checkpoint, and for a
    # checkpoint of another job, both of which the start then refused
    from lte.common.job.config import job_from_dict
    from lte.common.job.run_metadata import resolved_job
    from lte.server.coordinator import Coordinator

    empty = tmp_path / "empty"
    empty.mkdir()
    flags = ["--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "20", "--print-config"]
    assert main([*flags, "--resume", str(empty)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"lte-server: error: cannot resume from {empty}: no checkpoint in")
        and err.count("\n") == 1
    )
    job = job_for_data(
        JobConfig(model="mlp", dataset="digits", heads=2, steps=20),
        dataset_metadata(JobConfig(model="mlp", dataset="digits", heads=2, steps=20), None),
    )
    c = Coordinator(job_from_dict(resolved_job(job)), None, checkpoint_dir=tmp_path / "run" / "checkpoints")
    c.save_checkpoint()
    c.close()
    assert main([*flags, "--resume", str(tmp_path / "run")]) == 0  # the same job
    capsys.readouterr()
    assert main([*flags, "--resume", str(tmp_path / "run"), "--reset-optimizer"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "reset_optimizer (checkpoint False, now True)" in captured.err
