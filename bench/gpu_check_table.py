"""The issue-14 acceptance table from one ``bench/gpu_check.sh`` run's raw output.

    python bench/gpu_check_table.py --dir bench/results/gpu-check-cuda-2026-12-01-1200 [--benchmarks BENCHMARKS.md]

Reads ``worker_bf16.json`` and ``worker_fp16.json`` (``bench/worker_cost.py``) and ``merge.json``
(``bench/merge_cost.py``) from ``--dir``; prints each target with what was measured and whether
it is met; with ``--benchmarks``, writes the same lines into that file's ``gpu-check`` section.
A file that is missing (its run failed or timed out) leaves its rows "not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mdsections import write_section  # noqa: E402

MB = 1 / 2**20


def _load(path: Path) -> list[dict] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _status(value: float | None, target: float, stretch: float | None, *, at_most: bool) -> str:
    if value is None:
        return "not measured"

    def ok(bound: float) -> bool:
        return value <= bound if at_most else value >= bound

    if stretch is not None and ok(stretch):
        return "met, stretch too"
    return "met" if ok(target) else "**missed**"


def acceptance_lines(out_dir: Path, command: str) -> list[str]:
    worker = _load(out_dir / "worker_bf16.json") or []
    worker16 = _load(out_dir / "worker_fp16.json") or []
    merge = _load(out_dir / "merge.json") or []
    full = next((r for r in worker if r["mode"] == "full"), None)
    device = (full or (merge[0] if merge else {})).get("device", "?")
    default_cache = device.startswith("cuda")  # the worker's default: cache on CUDA only

    def lte(rows: list[dict], quant: str, cache: bool) -> dict | None:
        return next(
            (r for r in rows if r["mode"] == "lte" and r["quant"] == quant and r["cache"] == cache), None
        )

    def step_ratio(row: dict | None, base: dict | None) -> float | None:
        return row["step_s_median"] / base["step_s_median"] if row and base else None

    int8, nf4 = lte(worker, "int8", default_cache), lte(worker, "nf4", default_cache)
    int8_other = lte(worker, "int8", not default_cache)
    state = int8["model_state_bytes"] / full["model_state_bytes"] if int8 and full else None
    one = next((r for r in merge if r["heads_per_push"] == 1), None)
    in_use = "grouped_addmm" if device.startswith("cuda") else "per_layer"  # apply_updates' default
    merge_ratio = one["gemm_s"] / one[f"{in_use}_s"] if one else None

    def fmt(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    card = (full or one or {}).get("card")
    if card is None:  # the CPU path: gpu_check.sh's machine.txt names the processor
        lines_ = (
            (out_dir / "machine.txt").read_text().splitlines() if (out_dir / "machine.txt").exists() else []
        )
        card = lines_[0].split(":", 1)[-1].strip() if lines_ else device
    what = (
        f"{full['model']} {full['image_size']}/{full['patch_size']}, batch {full['batch_size']}, "
        f"one head, r {full['rank']}"
        if full
        else "the worker runs failed"
    )
    cache_word = "cache on" if default_cache else "cache off"
    lines = [
        "## Mixed-precision worker and one-head merge (issue 14 acceptance)",
        "",
        f"`{command}` on {card}, {what}; raw output in `{out_dir}`. Worker rows: the worker's defaults on "
        f"this device ({cache_word}), bf16 autocast on both sides, AdamW state in fp32.",
        "",
        "| measure | target | stretch | measured | status |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| LTE int8 bf16 step / full bf16 step | <= 1.2x | <= 1.0x | {fmt(step_ratio(int8, full))}x "
        f"| {_status(step_ratio(int8, full), 1.2, 1.0, at_most=True)} |",
        f"| LTE nf4 bf16 step / full bf16 step | <= 1.3x | <= 1.1x | {fmt(step_ratio(nf4, full))}x "
        f"| {_status(step_ratio(nf4, full), 1.3, 1.1, at_most=True)} |",
        f"| model state, int8 / full AdamW ({cache_word}, counted) | <= 0.2 | | {fmt(state, 3)} "
        f"| {_status(state, 0.2, None, at_most=True)} |",
        f"| merge / plain GEMM, 1 head per push ({in_use.replace('_', ' ')}) | >= 0.7 | >= 0.9 | "
        f"{fmt(merge_ratio)} | {_status(merge_ratio, 0.7, 0.9, at_most=False)} |",
        "",
        "| run | step s | step / full | model state MB | state / full | peak MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, rows in (("bf16", worker), ("fp16", worker16)):
        base = next((r for r in rows if r["mode"] == "full"), None)
        for r in rows:
            name = f"full {label} AdamW" if r["mode"] == "full" else f"LTE {r['quant']} {label}"
            if r["mode"] == "lte":
                name += ", cache on" if r["cache"] else ", cache off"
            lines.append(
                f"| {name} | {r['step_s_median']:.4f} | {fmt(step_ratio(r, base))} | {r['model_state_bytes'] * MB:.0f} "
                f"| {r['model_state_bytes'] / base['model_state_bytes']:.3f} | {r['peak_bytes'] * MB:.0f} |"
            )
    if int8_other and int8:
        lines += [
            "",
            f"Frozen-weight cache: int8 step {int8_other['step_s_median']:.4f} s "
            f"({'on' if int8_other['cache'] else 'off'}) against {int8['step_s_median']:.4f} s "
            f"({'on' if int8['cache'] else 'off'}); the cache held "
            f"{abs(int8['weights_and_buffers'] - int8_other['weights_and_buffers']) * MB:.0f} MB.",
        ]
    if merge:
        lines += [
            "",
            "| heads per push | plain GEMM ms | per-layer ms | grouped bmm ms | grouped addmm ms "
            "| per-layer / GEMM | grouped bmm / GEMM | grouped addmm / GEMM |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        kinds = ("per_layer", "grouped_bmm", "grouped_addmm")
        for r in merge:
            lines.append(
                f"| {r['heads_per_push']} | {r['gemm_s'] * 1e3:.2f} | "
                + " | ".join(f"{r[f'{k}_s'] * 1e3:.2f}" for k in kinds)
                + " | "
                + " | ".join(f"{r['gemm_s'] / r[f'{k}_s']:.2f}" for k in kinds)
                + " |"
            )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="a gpu_check.sh output folder")
    p.add_argument("--command", default="bash bench/gpu_check.sh", help="the command, for the header")
    p.add_argument("--benchmarks", help="write the table into this Markdown file's gpu-check section")
    args = p.parse_args()
    out_dir = Path(args.dir)
    if not out_dir.is_dir():
        print(
            f"gpu_check_table.py: error: --dir {out_dir} is not a folder; pass gpu_check.sh's output folder",
            file=sys.stderr,
        )
        return 2
    lines = acceptance_lines(out_dir, args.command)
    print("\n".join(lines))
    if args.benchmarks:
        write_section(Path(args.benchmarks), "gpu-check", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
