"""Batch norm after ``lte-sim``: the exported running statistics against the same weights with
statistics recomputed over the training set (cumulative average, momentum=None).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bn_statistics.py

Before the state policy the master's statistics never moved (mean 0, variance 1): the export
evaluated below the recomputed ones. Now they are the workers' averaged statistics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.commands.sim import run_lte  # noqa: E402
from lte.common.data.datasets import load_dataset  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.trainer import build_job_model, evaluate  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    data = load_dataset("digits", seed=0)
    job = JobConfig(
        model="tests.gallery_models:batchnorm", dataset="digits", heads=4, steps=200, merge_every=10,
        batch_size=16, lr=0.01,
    ).with_dataset(data)  # fmt: skip
    model = build_job_model(job)
    model.load_state_dict(run_lte(job, data, workers=2).master)
    exported = evaluate(model, data)["test_accuracy"]
    norm = model[2]
    print(f"exported running_var[:3] {[round(v, 3) for v in norm.running_var[:3].tolist()]}, "
          f"num_batches_tracked {int(norm.num_batches_tracked)}")  # fmt: skip
    norm.reset_running_stats()
    norm.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(data.train_x), 256):
            model(data.train_x[i : i + 256].to(job.torch_dtype))
    recomputed = evaluate(model, data)["test_accuracy"]
    print(f"test accuracy: exported statistics {exported:.4f}, recomputed {recomputed:.4f}, "
          f"difference {100 * (recomputed - exported):+.2f} points")  # fmt: skip


if __name__ == "__main__":
    main()
