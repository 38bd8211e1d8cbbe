"""Training quality: vit-micro in the zoo and the sweep harness ``bench/quality.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lte.common.models import build_model, count_parameters

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
