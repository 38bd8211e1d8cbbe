"""The emulator and its baselines."""

from __future__ import annotations

import json

import pytest
import torch

from lte.commands.sim import main, partition_heads, run_diloco, run_full
from lte.common.data.datasets import load_dataset
from lte.common.job.config import JobConfig

DIGITS = load_dataset("digits", seed=0)


def test_partition_heads_is_contiguous_and_complete():
    assert partition_heads(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="workers must be in"):
        partition_heads(2, 3)


def test_diloco_with_one_replica_is_full_training():
    job = JobConfig(model="mlp", heads=4, steps=20, merge_every=5, dtype="float64").with_dataset(DIGITS)
    full = run_full(job, DIGITS).master
    diloco = run_diloco(job, DIGITS, workers=1).master
    for name, value in full.items():
        torch.testing.assert_close(diloco[name], value, rtol=1e-12, atol=1e-12)


def test_diloco_averages_replicas():
    """After one sync the master is the mean of the two replicas, each trained alone on its block."""
    from lte.commands.sim import _full_step
    from lte.common.data.datasets import HeadBatches
    from lte.common.job.trainer import build_job_model, make_optimizer

    job = JobConfig(model="mlp", heads=4, steps=10, merge_every=10, dtype="float64").with_dataset(DIGITS)
    result = run_diloco(job, DIGITS, workers=2)
    assert result.rounds == 1 and result.samples == 10 * 4 * job.batch_size
    alone = []
    for block in partition_heads(job.heads, 2):  # each replica trained alone, from the same init
        model = build_job_model(job)
        model.train()
        opt = make_optimizer(model.parameters(), job)
        heads = [
            HeadBatches(DIGITS.train_x, DIGITS.train_y, h, job.heads, job.batch_size, job.seed) for h in block
        ]
        for step in range(job.steps):
            _full_step(model, opt, heads, step, job, DIGITS.task, "cpu")
        alone.append(model.state_dict())
    for name, value in result.master.items():
        torch.testing.assert_close(value, (alone[0][name] + alone[1][name]) / 2, rtol=1e-12, atol=1e-12)
    moved = [name for name in result.master if not torch.equal(alone[0][name], alone[1][name])]
    assert moved, "the two replicas trained on different data must differ, or the mean proves nothing"


def test_cli_prints_one_json_line_with_the_results(capsys):
    assert (
        main(["--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "20", "--json", "--quiet"])
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert {"test_accuracy", "test_loss", "samples", "steps", "seconds"} <= set(summary)
    assert summary["samples"] == 20 * 2 * 16


def test_cli_errors_say_what_to_do(capsys):
    assert main(["--dataset", "fashion-mnist", "--data-dir", "/nonexistent", "--quiet"]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err


def test_default_warmup_follows_the_steps_of_a_replaced_job():
    import dataclasses

    job = JobConfig(steps=500)
    assert job.warmup == 25
    assert dataclasses.replace(job, steps=40).warmup == 2  # resolved on use, not frozen at 500 steps
    assert JobConfig(steps=40, warmup_steps=0).warmup == 0
    with pytest.raises(ValueError, match="warmup_steps"):
        JobConfig(warmup_steps=-2)


def test_the_export_is_the_servers_one_function_with_its_metadata(tmp_path, capsys):
    """lte-sim --export writes through lte.common.job.export.export_model, as lte-server does: the
    resolved job, the preprocessing, the package version and the model version (merges)."""
    from safetensors import safe_open

    from lte import __version__

    path = tmp_path / "model.safetensors"
    args = ["--model", "mlp", "--dataset", "digits", "--heads", "2", "--steps", "4", "--merge-every", "2"]
    assert main([*args, "--quiet", "--export", str(path)]) == 0
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert {"lte_job", "lte_preprocessing", "lte_version", "version"} <= set(meta)
    assert meta["lte_version"] == __version__ and meta["version"] == "2"  # 4 steps, T 2: two merges
    assert json.loads(meta["lte_job"])["heads"] == 2
    assert json.loads(meta["lte_preprocessing"])["pixel_scale"] == 16.0
