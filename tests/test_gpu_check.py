"""bench/gpu_check.sh's option checks and its acceptance table, on generated raw output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.process  # tier: see tests/conftest.py (both run bench/gpu_check.sh)


def test_gpu_check_refuses_an_unknown_device_or_option_in_one_line():
    for args in (["--device", "tpu"], ["--bogus"]):
        run = subprocess.run(
            ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1 and "gpu_check.sh: error:" in run.stderr


def _worker_row(mode: str, quant: str, cache: bool, step: float, state: int, weights: int) -> dict:
    return {
        "mode": mode, "quant": quant, "cache": cache, "device": "cuda", "card": "Some GPU",
        "step_s_median": step, "model_state_bytes": state << 20, "weights_and_buffers": weights << 20,
        "peak_bytes": 5 << 30, "model": "vit-b", "image_size": 224, "patch_size": 16, "batch_size": 64,
        "rank": 64,
    }  # fmt: skip


def test_the_acceptance_table_judges_each_target_and_writes_its_section(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    rows = [
        _worker_row("full", "none", False, 0.100, 1000, 300),
        _worker_row("lte", "int8", True, 0.115, 190, 120),  # 1.15x: met, not the stretch
        _worker_row("lte", "nf4", True, 0.140, 170, 100),  # 1.40x: missed
        _worker_row("lte", "int8", False, 0.200, 150, 80),
    ]
    (out / "worker_bf16.json").write_text(json.dumps(rows))
    merge = [{"heads_per_push": 1, "device": "cuda", "gemm_s": 1.0, "per_layer_s": 3.0,
              "grouped_bmm_s": 1.3, "grouped_addmm_s": 1.05}]  # fmt: skip
    (out / "merge.json").write_text(json.dumps(merge))  # no worker_fp16.json: that run "failed"
    bench_md = tmp_path / "BENCHMARKS.md"
    bench_md.write_text("# Benchmarks\n\nhand-written notes\n")
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check_table.py"), "--dir", str(out), "--benchmarks", str(bench_md)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    table = {
        line.split(" | ")[0].lstrip("| "): line for line in run.stdout.splitlines() if line.startswith("| ")
    }
    assert "1.15x | met |" in table["LTE int8 bf16 step / full bf16 step"]
    assert "1.40x | **missed** |" in table["LTE nf4 bf16 step / full bf16 step"]
    assert "0.190 | met |" in table["model state, int8 / full AdamW (cache on, counted)"]
    assert "0.95 | met, stretch too |" in table["merge / plain GEMM, 1 head per push (grouped addmm)"]
    assert "the cache held 40 MB" in run.stdout
    text = bench_md.read_text()
    assert "Some GPU, vit-b 224/16, batch 64, one head, r 64" in text
    assert "hand-written notes" in text and "<!-- gpu-check:start -->" in text and "Some GPU" in text

    missing = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check_table.py"), "--dir", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "--dir" in missing.stderr
