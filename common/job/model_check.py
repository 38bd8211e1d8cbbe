"""Start-up check and ``--explain-model``: the job's model converted on the meta device (no memory,
no time) with the workers' code, before any worker joins."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
from torch import nn

from lte.common.core.layers import LayoutError
from lte.common.core.outputs import forward_logits
from lte.common.core.policy import (
    AVERAGED,
    FROZEN,
    HEADS,
    LOCAL,
    REPLICA,
    ModelPolicy,
    ModelRefused,
    classify_model,
    convert_model,
    expect_stacked_batch,
)
from lte.common.core.quant import quantized_zeros
from lte.common.job.config import JobConfig
from lte.common.job.progress import format_bytes
from lte.common.job.trainer import build_job_model

UPLINK_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8-block": 1.0 + 4.0 / 64}
FULL_RANK_WARN = 0.10  # warn when more than this share of the uplink travels full-rank


def _meta_model(job: JobConfig) -> nn.Module:
    with torch.device("meta"):
        return build_job_model(job)


def check_job_model(job: JobConfig, sample: torch.Tensor, heads: int) -> ModelPolicy:
    """Convert the job's model as a worker holding ``heads`` heads does and run one training forward
    on a meta batch shaped like ``sample`` (one input, no batch dim).

    Raises ``ModelRefused`` with one line naming the module or parameter and what to do.
    """
    heads = max(1, min(heads, job.heads))
    try:
        plain = _meta_model(job)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        raise ModelRefused(f"model {job.model}: cannot build it: {exc}") from None
    policy = classify_model(plain, heads=heads, embeddings=job.embedding_heads)
    model = convert_model(plain, job.lte_config(list(range(heads))))
    rows = heads * job.batch_size
    expect_stacked_batch(model, rows)
    model.train()
    x = torch.empty(
        (rows, *sample.shape),
        dtype=sample.dtype if not sample.is_floating_point() else job.torch_dtype,
        device="meta",
    )
    try:
        forward_logits(model, x)
    except LayoutError as exc:
        raise ModelRefused(f"model {job.model}: {exc}") from None
    except NotImplementedError:
        pass  # an op without a meta kernel: the workers check the layout at their first step
    except RuntimeError as exc:
        if "meta tensor" not in str(exc):  # not data-dependent code (transformers' masks call .item())
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelRefused(
                f"model {job.model}: its forward fails on a batch of shape {tuple(x.shape)}: {first}"
            ) from None
    except (ValueError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRefused(
            f"model {job.model}: its forward fails on a batch of shape {tuple(x.shape)}: {first}"
        ) from None
    return policy


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    return numel * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8


def explain_rows(policy: ModelPolicy, job: JobConfig, heads: int) -> list[dict]:
    """Per state entry: kind, shape, a worker's memory (``heads`` heads) and its bytes per round up
    (before zstd) and down (a new version's snapshot, before zstd).

    Memory: heads hold ``A, B`` with gradients and two AdamW moments (4x) and ``B', A'``, plus the
    base ``q(W)``; replicas hold value, gradient, two moments and the snapshot base (5x); averaged
    buffers value and base (2x); frozen and worker-local entries their value; tied names nothing.
    """
    r, wire = job.rank, UPLINK_BYTES.get(job.uplink, 4.0)
    dt = job.torch_dtype
    rows = []
    for e in policy.entries.values():
        value = _nbytes(e.numel, dt if e.dtype.is_floating_point else e.dtype)
        if e.kind == HEADS:
            m = e.shape[0]
            n = e.numel // m
            factors = heads * r * (m + n)
            base = value if job.quant == "none" else quantized_zeros(job.quant, (m, n), device="meta").nbytes
            memory = base + 5 * _nbytes(factors, dt)
            up, down = int(factors * wire), base
        elif e.kind == REPLICA:
            memory, up, down = 5 * value, 4 * e.numel, 4 * e.numel
        elif e.kind == AVERAGED:
            memory, up, down = 2 * value, 4 * e.numel, 4 * e.numel
        elif e.kind in (FROZEN, LOCAL):
            memory, up, down = value, 0, 4 * e.numel
        else:  # TIED
            memory, up, down = 0, 0, 0
        rows.append({"name": e.name, "kind": e.kind, "module": e.module, "shape": list(e.shape),
                     "memory_bytes": memory, "up_bytes": up, "down_bytes": down, "note": e.note})  # fmt: skip
    return rows


def explain_summary(rows: list[dict]) -> dict:
    """Totals by kind and the full-rank share of the uplink (replicas and averaged buffers)."""
    up = sum(r["up_bytes"] for r in rows)
    full = sum(r["up_bytes"] for r in rows if r["kind"] in (REPLICA, AVERAGED))
    by_kind: dict[str, int] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    return {
        "entries": by_kind,
        "memory_bytes": sum(r["memory_bytes"] for r in rows),
        "up_bytes_per_round": up,
        "down_bytes_per_version": sum(r["down_bytes"] for r in rows),
        "full_rank_up_share": full / up if up else 0.0,
    }


def format_explain(policy: ModelPolicy, job: JobConfig, heads: int) -> str:
    """The ``--explain-model`` table, its totals, and warnings."""
    rows = explain_rows(policy, job, heads)
    summary = explain_summary(rows)
    width = max([len(r["name"]) for r in rows] + [4])
    lines = [
        f"model {job.model}: a worker with {heads} head(s), rank {job.rank}, quant {job.quant}, uplink {job.uplink}",
        f"{'name':<{width}}  {'how it trains':<19}  {'shape':<18}  {'worker memory':>13}  {'up/round':>10}  "
        f"{'down/version':>12}  note",
    ]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {r['kind']:<19}  {str(tuple(r['shape'])):<18}  "
            f"{format_bytes(r['memory_bytes']):>13}  {format_bytes(r['up_bytes']):>10}  "
            f"{format_bytes(r['down_bytes']):>12}  {r['note']}"
        )
    lines.append(
        f"total: worker memory {format_bytes(summary['memory_bytes'])}, up {format_bytes(summary['up_bytes_per_round'])}"
        f"/round (before zstd), down {format_bytes(summary['down_bytes_per_version'])}/version; "
        f"full-rank share of the uplink {summary['full_rank_up_share']:.1%}"
    )
    lines += [f"warning: {w}" for w in explain_warnings(policy, summary)]
    return "\n".join(lines)


def startup_model_check(
    job: JobConfig, dataset, heads: int, explain: bool = False, prog: str = "lte"
) -> str | None:
    """What ``lte-server`` and ``lte-sim`` run before anything starts: the conversion and a meta
    forward (``check_job_model``); with ``explain``, the ``--explain-model`` text to print.

    Warnings (batch norm across vectorised heads, a full-rank uplink) go to stderr as
    ``<prog>: warning: ...`` lines; none when ``prog`` is empty. Raises ``ModelRefused`` (a
    ValueError: the CLIs print one line and exit 2).
    """
    if dataset.task == "lm":  # one window of token ids
        sample = torch.zeros(max(1, job.context), dtype=torch.long)
    else:
        sample = dataset.train_x[0]
    policy = check_job_model(job, sample, heads)
    if explain:
        return format_explain(policy, job, heads)
    warnings = explain_warnings(policy, explain_summary(explain_rows(policy, job, heads))) if prog else []
    for warning in warnings:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    return None


def checkpoint_mismatch(
    master: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> str | None:
    """The first difference between a checkpoint's ``master/<name>`` tensors and the job's model
    (a missing name, a shape, an extra name), as one line with what to do; None when they match."""
    saved = {k.removeprefix("master/"): v for k, v in tensors.items() if k.startswith("master/")}
    advice = "the model's code changed since the checkpoint was written; resume with the same model, or start a new run"
    for name, value in master.items():
        if name not in saved:
            return f"the checkpoint has no tensor {name!r}, which the job's model has: {advice}"
        if tuple(saved[name].shape) != tuple(value.shape):
            return (
                f"tensor {name!r} has shape {tuple(saved[name].shape)} in the checkpoint and "
                f"{tuple(value.shape)} in the job's model: {advice}"
            )
    extra = [n for n in saved if n not in master]
    if extra:
        return f"the checkpoint has tensor {extra[0]!r}, which the job's model lacks: {advice}"
    return None


def model_summary(policy: ModelPolicy, job: JobConfig, heads: int) -> dict:
    """``explain_summary`` plus the warnings ``--explain-model`` prints (for the dashboard)."""
    summary = explain_summary(explain_rows(policy, job, heads))
    return {**summary, "warnings": explain_warnings(policy, summary)}


def explain_warnings(policy: ModelPolicy, summary: dict) -> list[str]:
    warnings = list(policy.warnings)
    if summary["full_rank_up_share"] > FULL_RANK_WARN:
        warnings.append(
            f"{summary['full_rank_up_share']:.0%} of the uplink travels full-rank (replicas, averaged buffers): "
            "see the rows marked replica"
        )
    return warnings
