"""Training-quality options: vit-micro in the zoo, the replicas' own lr and weight decay, and the
sweep harness ``bench/quality.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lte.common.config import JobConfig
from lte.common.data import load_dataset
from lte.common.lte import replica_parameters
from lte.common.models import build_model, count_parameters
from lte.common.sim import main as sim_main
from lte.common.trainer import LocalTrainer, build_job_model, linear_weight_names, make_snapshot

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality.py"


def test_vit_micro_is_the_small_vit_of_the_quality_benchmark():
    model = build_model("vit-micro", image_size=28, in_channels=1, num_classes=10)
    cfg = model.config
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size) == (128, 4, 4, 512, 4)
    # patch 16 -> 128, 4 blocks of (qkv, proj, fc1, fc2), 10-way head, position table of 1 + 49 rows
    linears = 16 * 128 + 128 + 4 * (128 * 384 + 384 + 128 * 128 + 128 + 2 * 128 * 512 + 512 + 128) + 1290
    norms = (2 * 4 + 1) * 2 * 128
    assert count_parameters(model) == linears + norms + 128 + 50 * 128
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def _one_step(**job_fields) -> tuple[LocalTrainer, dict[str, torch.Tensor]]:
    data = load_dataset("digits", seed=0)
    job = JobConfig(
        model="vit-micro", dataset="digits", heads=2, rank=4, merge_every=1, steps=100, warmup_steps=0,
        dtype="float64", **job_fields,
    ).with_dataset(data)  # fmt: skip
    master = build_job_model(job)
    trainer = LocalTrainer(job, [0, 1], data)
    trainer.load_snapshot(make_snapshot(master.state_dict(), linear_weight_names(master), "none"))
    trainer.train_round(1)
    return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_replica_lr_scales_the_replicas_first_step_and_leaves_the_factors_alone():
    base, before = _one_step(lr=1e-3)
    faster, after = _one_step(lr=1e-3, replica_lr=4e-3)
    replicas = set(replica_parameters(base.model))
    assert {"pos_embed", "blocks.0.norm1.weight", "head.bias"} <= replicas
    moved = 0
    for name, p in before.items():
        if name in replicas:
            delta = base.export_update()[1].deltas[name]
            delta_fast = faster.export_update()[1].deltas[name]
            # AdamW's first step is lr * g / (|g| + eps): 4x the lr, 4x the step, sign for sign
            torch.testing.assert_close(delta_fast, 4 * delta, rtol=1e-9, atol=1e-15)
            moved += int(delta.abs().max() > 0)
        else:
            assert torch.equal(p, after[name]), name  # the heads' factors train at --lr either way
    assert moved > 10
    assert [g["lr"] for g in faster.optimizer.param_groups] == pytest.approx([1e-3, 4e-3])


def test_replica_weight_decay_shrinks_only_the_replicas():
    plain, before = _one_step(lr=1e-3)
    decayed, after = _one_step(lr=1e-3, replica_weight_decay=0.5)
    replicas = set(replica_parameters(plain.model))
    for name, p in before.items():
        if name in replicas:
            # decoupled decay: p <- p - lr * wd * p_old before the Adam step; the snapshot value is p_old
            p_old = plain.replica_base[name]
            torch.testing.assert_close(after[name], p - 1e-3 * 0.5 * p_old, rtol=0, atol=1e-15)
        else:
            assert torch.equal(p, after[name]), name
    assert decayed.optimizer.param_groups[0]["weight_decay"] == 0.0


def test_bad_replica_options_are_one_line_errors(capsys):
    with pytest.raises(ValueError, match="replica_lr must be >= 0"):
        JobConfig(replica_lr=-1e-3)
    with pytest.raises(ValueError, match="replica_weight_decay must be >= 0"):
        JobConfig(replica_weight_decay=-0.5)
    assert sim_main(["--replica-lr", "-1", "--quiet"]) == 2
    assert "lte-sim: error: replica_lr must be >= 0" in capsys.readouterr().err


def test_replica_options_reach_the_workers():
    from lte.server.service import job_to_proto
    from lte.worker.client import job_from_proto

    job = JobConfig(replica_lr=3e-3, replica_weight_decay=0.05)
    back = job_from_proto(job_to_proto(job))
    assert (back.replica_lr, back.replica_weight_decay) == (3e-3, 0.05)
    assert job_from_proto(job_to_proto(JobConfig())).replica_weight_decay == -1.0


def _load_bench():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_harness_trains_both_kinds_resumes_and_tabulates(tmp_path, capsys):
    quality = _load_bench()
    results = tmp_path / "q.jsonl"
    argv = ["--model", "mlp", "--dataset", "digits", "--steps", "20", "--heads", "2", "--seeds", "0", "1",
            "--results", str(results), "--run", "full lr=1e-2", "--run", "lte rank=4 lr=1e-2 x=1.5"]  # fmt: skip
    assert quality.main(argv) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["label"], r["seed"], r["steps"]) for r in records] == [
        ("full lr=0.01", 0, 20), ("full lr=0.01", 1, 20),
        ("lte rank=4 lr=0.01 x=1.5", 0, 30), ("lte rank=4 lr=0.01 x=1.5", 1, 30),
    ]  # fmt: skip
    assert records[0]["test_accuracy"] != records[1]["test_accuracy"]  # the seed reached the run
    out = capsys.readouterr().out
    assert "| `full lr=0.01` (best full) | 20 | 0 1 |" in out
    assert quality.main(argv) == 0  # everything is in the file already: nothing retrains
    assert len(results.read_text().splitlines()) == 4
    with pytest.raises(SystemExit):
        quality.main(["--results", str(results), "--run", "lte nosuchfield=1"])
