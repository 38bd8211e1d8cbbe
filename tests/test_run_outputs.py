"""What one real local-cluster run leaves behind: worker logs, resolved config, a self-describing model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lte.common.job.config import JobConfig
from lte.common.job.run_metadata import resolved_job


def command(tool: str) -> str:
    return str(Path(sys.executable).parent / f"lte-{tool}")  # the installed console script


def run(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=dict(env, OMP_NUM_THREADS="1")
    )


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``lte-server --local-workers 2`` from a folder that holds a user's own ``lte/`` package."""
    cwd = tmp_path_factory.mktemp("cwd")
    shadow = cwd / "lte"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('this is not the lte package')\n")
    result = run(
        command("server"),
        *("--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "20", "--local-workers", "2"),
        *("--port", "0", "--dashboard-port", "-1", "--out", "run"),
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return cwd / "run", result


@pytest.mark.process
def test_local_workers_ignore_an_lte_folder_in_the_cwd_and_log_to_their_files(cluster_run):
    run_dir, result = cluster_run
    for i in range(2):
        log = (run_dir / f"worker-{i}.log").read_text()
        assert "ImportError" not in log
        assert "registered: heads" in log and "job finished: 2 head-rounds in 2 pushes" in log, log
        assert re.search(r"up \d+(\.\d)? [KM]iB, down \d+(\.\d)? [KM]iB", log), log  # binary units
        assert "e+0" not in log  # rates read 12k, not 1.243e+04
    assert re.search(r"up \d+(\.\d)? [KM]iB, down \d+(\.\d)? [KM]iB", result.stderr), result.stderr


@pytest.mark.process
def test_the_exported_model_says_how_to_rebuild_and_feed_it(cluster_run):
    run_dir, _ = cluster_run
    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    job = json.loads(meta["lte_job"])
    assert (
        job["warmup_steps"] == 1 and "patch_size" not in job
    )  # resolved: 5% of 20 steps; an MLP has no patches
    JobConfig(**job)  # the metadata rebuilds a valid job as is
    prep = json.loads(meta["lte_preprocessing"])
    assert prep["pixel_scale"] == 16.0 and prep["image_size"] == 8 and prep["in_channels"] == 1
    assert len(prep["mean"]) == len(prep["std"]) == 1 and prep["std"][0] > 0
    from lte import __version__

    assert meta["lte_version"] == __version__ and meta["version"] == "2"


@pytest.mark.process
def test_the_run_config_holds_effective_values_not_placeholders(cluster_run):
    from lte.common.job.checks import read_toml

    config = read_toml(cluster_run[0] / "config.toml")
    assert config["warmup_steps"] == 1 and config["eval_every"] >= 1 and config["checkpoint_every"] >= 1
    assert config["heads_per_worker"] == 1  # N / local workers


@pytest.mark.process
def test_lte_eval_reproduces_the_server_s_final_evaluation(cluster_run):
    run_dir, _ = cluster_run
    summary = json.loads((run_dir / "summary.json").read_text())
    result = run(command("eval"), str(run_dir), "--json", cwd=run_dir)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    assert evaluated["test_accuracy"] == summary["test_accuracy"]
    assert evaluated["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    assert evaluated["version"] == summary["version"] == 2


@pytest.mark.process
def test_lte_eval_refuses_a_file_that_is_not_an_export(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    result = run(command("eval"), str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "not a readable safetensors file" in result.stderr, result.stderr
    result = run(command("eval"), str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr and "no such file" in result.stderr


def test_a_vit_export_names_its_patch_size():
    job = JobConfig(
        model="vit-tiny", dataset="digits", image_size=8, in_channels=1, num_classes=10, steps=100
    )
    values = resolved_job(job)
    assert values["patch_size"] == 2 and values["warmup_steps"] == 5


@pytest.mark.process
def test_a_trained_export_runs_in_plain_torch_from_its_metadata_alone(cluster_run):
    """No lte layer, no lte model class: safetensors, torch.nn.functional and the file's metadata."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from lte.common.data.datasets import load_dataset

    run_dir, _ = cluster_run
    weights = load_file(str(run_dir / "model.safetensors"))
    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as fh:
        prep = json.loads(fh.metadata()["lte_preprocessing"])
    mean, std = torch.tensor(prep["mean"]), torch.tensor(prep["std"])

    def plain_mlp(raw_pixels: torch.Tensor) -> torch.Tensor:  # raw pixels, as a user has them
        x = ((raw_pixels / prep["pixel_scale"]).flatten(1) - mean) / std
        x = F.gelu(F.linear(x, weights["hidden.0.weight"], weights["hidden.0.bias"]))
        x = F.gelu(F.linear(x, weights["hidden.1.weight"], weights["hidden.1.bias"]))
        return F.linear(x, weights["head.weight"], weights["head.bias"])

    # the server's test split, turned back into raw 0..16 pixels: what a user would feed
    digits = load_dataset("digits", seed=0)
    own_mean, own_std = digits.extras["mean"].view(1, -1, 1, 1), digits.extras["std"].view(1, -1, 1, 1)
    raw = ((digits.test_x * own_std + own_mean) * 16.0).round()
    accuracy = (plain_mlp(raw).argmax(1) == digits.test_y).float().mean().item()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert abs(accuracy - summary["test_accuracy"]) <= 1 / len(digits.test_y)  # at most one image apart
    from lte.common.job.trainer import build_job_model

    initial = build_job_model(
        JobConfig(**json.loads(safe_open(str(run_dir / "model.safetensors"), "pt").metadata()["lte_job"]))
    )
    assert not torch.equal(
        initial.state_dict()["head.weight"], weights["head.weight"]
    )  # trained, not the init


@pytest.mark.process
def test_lte_eval_loads_an_image_folder_at_the_job_s_size_and_streams_it(tmp_path):
    """An imagefolder model trained at --image-size 8 (not the loader's default 32) evaluates to
    exactly lte-sim's figures, and its test split stays files decoded per batch."""
    from tests.test_image_data import write_classes

    write_classes(tmp_path / "data", {"cat": 12, "dog": 12, "owl": 12}, size=16)
    trained = run(
        command("sim"),
        *("--model", "mlp", "--dataset", "imagefolder", "--data-dir", "data", "--image-size", "8"),
        *("--heads", "2", "--steps", "10", "--batch-size", "4", "--export", "m/model.safetensors"),
        *("--json", "--quiet"),
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    want = json.loads(trained.stdout.strip().splitlines()[-1])
    result = run(command("eval"), "m/model.safetensors", "--data-dir", "data", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert (got["test_accuracy"], got["test_loss"]) == (want["test_accuracy"], want["test_loss"])

    from lte.commands.eval import restandardise
    from lte.common.data.datasets import load_job_dataset
    from lte.common.data.images import ImageFiles

    job = JobConfig(dataset="imagefolder", image_size=8, seed=0)
    dataset = load_job_dataset(job, str(tmp_path / "data"))
    restandardise(dataset, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    assert isinstance(dataset.test_x, ImageFiles)  # not decoded into one tensor
    assert dataset.test_x.mean.tolist() == [0.5] * 3 and dataset.test_x.std.tolist() == [0.25] * 3


@pytest.mark.process
def test_the_readme_s_parity_claim_holds_through_the_commands(tmp_path):
    """README: lte-server --local-workers 2 and lte-sim --workers 2, both --uplink fp32 and one
    thread, export exactly the same weights (the network adds nothing to the arithmetic)."""
    from safetensors.torch import load_file

    job = ("--model", "mlp", "--dataset", "digits", "--heads", "4", "--steps", "20", "--batch-size", "8")
    job += ("--seed", "3", "--uplink", "fp32", "--threads", "1")
    sim = run(command("sim"), *job, "--workers", "2", "--export", "sim.safetensors", "--quiet", cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr
    server = run(
        command("server"),
        *job,
        *("--local-workers", "2", "--port", "0", "--dashboard-port", "-1", "--out", "run", "--quiet"),
        cwd=tmp_path,
    )
    assert server.returncode == 0, server.stderr
    a, b = (
        load_file(str(tmp_path / "sim.safetensors")),
        load_file(str(tmp_path / "run" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a)  # trained weights, not two empty files
