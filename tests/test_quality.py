"""Training quality: vit-micro in the zoo and the sweep harness ``bench/quality.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lte.common.job.models import build_model, count_parameters

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
    # a test subset (README's quick run of the benchmark block) is another result: trained, kept apart
    assert quality.main([*argv[:-4], "--run", "full lr=1e-2", "--eval-samples", "60"]) == 0
    subset = [json.loads(line) for line in results.read_text().splitlines()][4:]
    assert [(r["label"], r["seed"], r["eval_samples"]) for r in subset] == [
        ("full lr=0.01", s, 60) for s in (0, 1)
    ]
    table = capsys.readouterr().out.split("command:")[-2]  # the table of this run: the subset's only
    assert "| `full lr=0.01` (best full) | 20 | 0 1 |" in table and "| `lte rank=4" not in table
    with pytest.raises(SystemExit):
        quality.main(["--results", str(results), "--run", "lte nosuchfield=1"])


def test_language_model_rows_rank_by_validation_loss_lower_is_better():
    quality = _load_bench()

    def record(label: str, seed: int, loss: float) -> dict:
        return {"label": label, "seed": seed, "test_accuracy": None, "test_loss": loss,
                "steps": 10, "seconds": 6.0}  # fmt: skip

    text = quality.table(
        [
            record("full lr=0.001", 0, 2.0),
            record("full lr=0.003", 0, 1.5),
            record("lte rank=8 x=1.3", 0, 1.75),
        ]
    )
    assert "validation loss (mean)" in text
    assert "| `full lr=0.003` (best full) | 10 | 0 | 1.5000 |" in text  # the lowest loss, not the highest
    assert "| `lte rank=8 x=1.3` | 10 | 0 | 1.7500 | 1.7500 | +0.2500 |" in text  # above full: a positive gap


QUEUE_SCRIPT = BENCH.parent / "quality_gpu.sh"


@pytest.mark.process
def test_the_gpu_sweep_script_runs_a_queue_in_parallel_and_tabulates(tmp_path):
    queue = tmp_path / "queue.txt"
    queue.write_text(
        "# a comment line\n"
        "--model mlp --dataset digits --heads 2 --steps 6 --seeds 0 --run 'full lr=1e-2'\n"
        "\n"
        "--model mlp --dataset digits --heads 2 --steps 6 --seeds 0 --run 'lte rank=4 lr=1e-2 x=1.5'\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": sys.executable}
    proc = subprocess.run(
        ["bash", str(QUEUE_SCRIPT), "--device", "cpu", "--queue", str(queue), "--parallel", "2", "--deadline", "240"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "quality-mlp-6.jsonl").read_text().splitlines()]
    assert sorted((r["label"], r["steps"], r["device"]) for r in records) == [
        ("full lr=0.01", 6, "cpu"), ("lte rank=4 lr=0.01 x=1.5", 9, "cpu"),
    ]  # fmt: skip
    assert "(best full)" in (out / "table-mlp-6.md").read_text()
    assert "2 runs, 2 at a time" in proc.stdout and "2 of 2 runs finished" in proc.stdout

    # a run that fails (its data folder is missing) leaves the others' rows and fails the script
    queue.write_text(
        "--model mlp --dataset digits --heads 2 --steps 6 --seeds 1 --run 'full lr=1e-2'\n"
        f"--model mlp --dataset imagefolder --data-dir {tmp_path / 'nowhere'} --steps 6 --seeds 0 --run 'full'\n"
    )
    proc = subprocess.run(
        ["bash", str(QUEUE_SCRIPT), "--device", "cpu", "--queue", str(queue), "--parallel", "2", "--deadline", "240"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "1 of 2 runs finished" in proc.stdout
    assert "1 run(s) failed, were stopped at the deadline or never started" in proc.stderr
    assert len((out / "quality-mlp-6.jsonl").read_text().splitlines()) == 3  # seed 1 added to the two


@pytest.mark.process
def test_the_gpu_sweep_script_refuses_an_unknown_option_in_one_line():
    proc = subprocess.run(["bash", str(QUEUE_SCRIPT), "--nosuch"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "quality_gpu.sh: error: unknown option --nosuch (see the header of this file)"
    )


@pytest.mark.process
def test_the_gpu_sweep_script_refuses_bad_input_in_one_line_before_starting_anything(tmp_path):
    def refused(*args: str, queue: str | None = None) -> str:
        argv = list(args)
        if queue is not None:
            (tmp_path / "queue.txt").write_text(queue)
            argv += ["--queue", "queue.txt"]  # relative: the caller's folder, not the repository's
        env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable}
        proc = subprocess.run(
            ["bash", str(QUEUE_SCRIPT), "--device", "cpu", *argv],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30, check=False,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
        return proc.stderr.strip()

    run = "--model mlp --dataset digits --steps 6 --seeds 0 --run 'full lr=1e-2'\n"
    assert refused("--queue", "nope.txt") == "quality_gpu.sh: error: --queue nope.txt: no such readable file"
    assert refused(queue="# only a comment\n\n   \n").endswith("no runs in it (only blank or '#' lines)")
    assert refused(queue=run + run.replace("--steps 6 ", "")) == (
        "quality_gpu.sh: error: --queue queue.txt line 2: no '--steps N': "
        "--model mlp --dataset digits --seeds 0 --run 'full lr=1e-2'"
    )
    assert "line 1: no '--model NAME'" in refused(queue=run.replace("--model mlp ", ""))
    assert "line 2: unbalanced quotes" in refused(queue="# c\n" + run.replace("lr=1e-2'", "lr=1e-2"))
    assert (
        refused("--deadline", "soon", queue=run)
        == "quality_gpu.sh: error: --deadline soon: must be a whole number"
    )
    assert refused("--parallel", "0", queue=run) == "quality_gpu.sh: error: --parallel 0: must be at least 1"
    assert (
        refused("--deadline")
        == "quality_gpu.sh: error: --deadline needs a value (see the header of this file)"
    )


def test_quality_refuses_an_invalid_run_before_training_and_skips_a_cut_off_results_line(tmp_path, capsys):
    quality = _load_bench()
    results = tmp_path / "q.jsonl"
    argv = ["--model", "mlp", "--dataset", "digits", "--steps", "4", "--heads", "2", "--seeds", "0",
            "--results", str(results), "--run", "full lr=1e-2", "--run", "lte rank=0"]  # fmt: skip
    assert quality.main(argv) == 2
    assert capsys.readouterr().err.strip() == "quality: error: --run 'lte rank=0': rank must be >= 1, got 0"
    assert not results.exists()  # the valid run before it did not train either
    assert "| test accuracy (mean) |" in quality.table([])  # no records: not a language model's table
    record = {"label": "full lr=0.01", "seed": 0, "model": "mlp", "dataset": "digits", "base_steps": 4, "steps": 4,
              "test_accuracy": 0.5, "test_loss": 1.0, "seconds": 1.0}  # fmt: skip
    results.write_text(json.dumps(record) + "\n" + json.dumps(record)[:40])  # a line cut off mid-write
    assert quality.load_results(results) == [record]
    assert "line 2 is not a JSON record; skipped" in capsys.readouterr().err
    assert quality.main(["--model", "mlp", "--steps", "4", "--results", str(results), "--table-only"]) == 0
    assert "| `full lr=0.01` (best full) | 4 | 0 | 50.00 % |" in capsys.readouterr().out


def _load_parity():
    spec = importlib.util.spec_from_file_location("parity_bench", BENCH.parent / "parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts bench/ on sys.path: small_vit, quality, mdsections
    return module


def test_the_parity_model_is_the_issues_small_vit_and_its_variants_change_only_what_they_say():
    _load_parity()
    import small_vit

    model = small_vit.small_vit(28, 1, 10)
    # patch 16 -> 128, 4 blocks of (qkv, proj, fc1, fc2), 10-way head, 49 positions, 9 LayerNorms
    linears = 16 * 128 + 128 + 4 * (128 * 384 + 384 + 128 * 128 + 128 + 2 * 128 * 512 + 512 + 128) + 1290
    assert count_parameters(model) == linears + 9 * 2 * 128 + 49 * 128
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    plain = small_vit.small_vit_plain_norm(28, 1, 10)
    assert count_parameters(plain) == linears + 49 * 128
    frozen = small_vit.small_vit_frozen_bias(28, 1, 10)
    still = {n for n, p in frozen.named_parameters() if not p.requires_grad}
    assert len(still) == 4 * 4 + 2 and all(n.endswith(".bias") for n in still)
    assert "blocks.0.n1.bias" not in still and "embed.bias" in still


def test_the_parity_table_checks_each_seed_against_the_reference_within_half_a_point():
    parity = _load_parity()
    ref = parity.REFERENCE
    records = [
        {"label": "lte a", "seed": 0, "test_accuracy": ref[0] - 0.004, "seconds": 60},
        {"label": "lte a", "seed": 1, "test_accuracy": ref[1] + 0.01, "seconds": 60},
        {"label": "lte b", "seed": 0, "test_accuracy": ref[0] + 0.02, "seconds": 60},
        {"label": "lte b", "seed": 1, "test_accuracy": ref[1] - 0.006, "seconds": 60},
    ]
    rows = {line.split("|")[1].strip(): line for line in parity.parity_table(records, {"lte a"})[3:]}
    assert "| yes |" in rows["`lte a` (the defaults)"] and "| no |" in rows["`lte b`"]
    assert f"{100 * (ref[0] - 0.004):.2f} %" in rows["`lte a` (the defaults)"]
