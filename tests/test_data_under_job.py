"""Data that changes under a running job (issue 24, item 5), with a real lte-server and lte-worker:
the evaluation split is deleted after start-up. Each evaluation says so in one warning line (no
traceback), the score is never shown as current, and a job with no successful evaluation ends
non-zero naming the reason (the model is still saved)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lte.common.data.datasets import load_dataset
from lte.common.job.config import JobConfig
from lte.server.coordinator import Coordinator
from tests.faults import server_with_stderr, wait_until
from tests.test_image_data import write_classes

BIN = Path(sys.executable).parent


@pytest.mark.process
def test_a_deleted_evaluation_split_is_one_warning_per_evaluation_and_a_non_zero_end(tmp_path):
    data, copy = tmp_path / "data", tmp_path / "worker-data"
    write_classes(data, {"a": 10, "b": 10})
    shutil.copytree(data, copy)  # the worker's own copy: only the server's split goes away
    test_files = load_dataset("imagefolder", str(data), image_size=8).test_x.files
    env = {**{k: v for k, v in os.environ.items() if k != "LTE_TOKEN"}, "OMP_NUM_THREADS": "1"}
    job = ["--dataset", "imagefolder", "--image-size", "8", "--heads", "2", "--rank", "4", "--steps", "12",
           "--merge-every", "2", "--batch-size", "4", "--eval-every", "1"]  # fmt: skip
    server, lines, reader = server_with_stderr(
        [str(BIN / "lte-server"), "--data-dir", str(data), *job, "--port", "0", "--dashboard-port", "-1",
         "--out", str(tmp_path / "run"), "--linger", "0"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    worker = None
    try:
        hint = wait_until(
            lambda: (
                next((ln for ln in lines if "start workers with: " in ln), None) or server.poll() is not None
            ),
            240,
            "the server's address",
        )
        assert server.poll() is None, "".join(lines)
        address = re.search(r"--server (\S+)", hint).group(1)
        for f in test_files:  # the evaluation split disappears under the running job
            Path(f).unlink()
        worker = subprocess.Popen(
            [str(BIN / "lte-worker"), "--server", address, "--data-dir", str(copy), "--quiet", "--threads", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        code = server.wait(timeout=400)
        reader.join(timeout=30)
    finally:
        for proc in (server, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    err = "".join(lines)
    assert code == 1, err
    assert "Traceback" not in err
    failed = [ln for ln in lines if "evaluation at version" in ln and "failed" in ln]
    assert len(failed) >= 2 and all("FileNotFoundError" in ln or "No such file" in ln for ln in failed), err
    assert "no evaluation has succeeded yet" in failed[0]
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("lte-server: error: no evaluation succeeded in this job (")
        and "model.safetensors" in last
    )
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_a_failed_evaluation_marks_the_last_score_stale(tmp_path, caplog):
    write_classes(tmp_path, {"a": 10, "b": 10})
    dataset = load_dataset("imagefolder", str(tmp_path), image_size=8)
    job = JobConfig(model="mlp", dataset="imagefolder", heads=2, rank=4, steps=4, merge_every=2).with_dataset(
        dataset
    )
    c = Coordinator(job, dataset)
    assert c.evaluate_now()["test_accuracy"] is not None
    for f in dataset.test_x.files:
        Path(f).unlink()
    with caplog.at_level(logging.WARNING, logger="lte.server"):
        try:
            c.evaluate_now()
        except Exception as exc:
            reason = c.evaluations.failed(exc)
    records = [r for r in caplog.records if "evaluation at version 0 failed" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None  # one line, no traceback
    assert "the accuracy shown is version 0's (stale)" in records[0].getMessage()
    assert c.status()["eval_error"] == reason and c.evaluations.failures == 1
    c.close()
