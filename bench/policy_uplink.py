"""Uplink bytes per round of a worker before and after the state policy (``--explain-model``'s
accounting: factors in the uplink codec, replicas and averaged buffers in fp32, before zstd).

    python bench/policy_uplink.py                       # the gallery's MHA model and small transformer
    python bench/policy_uplink.py --heads 2 --rank 16

"Before" is the conversion this project had until the policy: only modules whose type is exactly
``nn.Linear`` got LTE heads, so MultiheadAttention's ``in_proj_weight`` and its ``out_proj`` (a
Linear subclass) trained as full-rank replicas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lte.common.core import policy  # noqa: E402
from lte.common.core.layers import LTELinear  # noqa: E402
from lte.common.data.datasets import load_dataset  # noqa: E402
from lte.common.job.config import JobConfig  # noqa: E402
from lte.common.job.model_check import check_job_model, explain_rows, explain_summary  # noqa: E402


class ExactLinearOnly(LTELinear):
    """The old rule: ``type(module) is nn.Linear``."""

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        return None if type(module) is nn.Linear else f"{type(module).__name__} is not exactly nn.Linear"


def measure(job: JobConfig, heads: int, sample) -> dict:
    summary = explain_summary(explain_rows(check_job_model(job, sample, heads), job, heads))
    return {"up": summary["up_bytes_per_round"], "share": summary["full_rank_up_share"],
            "memory": summary["memory_bytes"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tests.gallery_models:mha,tests.gallery_models:transformer")
    parser.add_argument("--heads", type=int, default=2, help="heads one worker holds [2]")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--uplink", default="fp16")
    args = parser.parse_args()
    data = load_dataset("digits", seed=0)
    print("| model | policy | up / round / worker | full-rank share | worker memory |")
    print("| --- | --- | ---: | ---: | ---: |")
    for model in args.models.split(","):
        job = JobConfig(model=model, dataset="digits", heads=args.heads, rank=args.rank, uplink=args.uplink)
        job = job.with_dataset(data)
        after = measure(job, args.heads, data.train_x[0])
        saved = policy.LTE_MODULES
        policy.LTE_MODULES = ((nn.Linear, ExactLinearOnly),)
        try:
            before = measure(job, args.heads, data.train_x[0])
        finally:
            policy.LTE_MODULES = saved
        for name, m in (("before (exact nn.Linear)", before), ("after (policy)", after)):
            print(f"| {model} | {name} | {m['up']:,} B | {m['share']:.1%} | {m['memory']:,} B |")


if __name__ == "__main__":
    main()
