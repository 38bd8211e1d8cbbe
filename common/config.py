"""The job configuration: one dataclass for the emulator, the server and (over the wire) the workers."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lte.common.lte import A_INITS, LTEConfig
from lte.common.quant import QUANT_KINDS

MODES = ("sync", "async", "buffered")
UPLINK_CODECS = ("fp32", "fp16", "bf16", "int8-block")
SNAPSHOT_CODEC = {"none": "fp32", "int8": "int8-row", "nf4": "nf4"}  # base quantisation -> downlink codec
DTYPES = ("float32", "float64")


@dataclass
class JobConfig:
    """Everything that defines an LTE training job. Workers receive it from the server."""

    model: str = "mlp"
    dataset: str = "digits"
    image_size: int = 0  # 0: the dataset's
    in_channels: int = 0
    num_classes: int = 0  # output width (classes, or regression targets)
    patch_size: int = 0  # 0: the zoo default for the image size
    task: str = ""  # filled from the dataset
    heads: int = 8  # N: LoRA heads in the whole job
    rank: int = 16
    alpha: float = 64.0
    merge_every: int = 10  # T: local steps per round
    reset: bool = False
    a_init: str = "semi-orthogonal"
    a_init_gain: float = 1.0
    quant: str = "none"  # base weights on the workers: none | int8 | nf4
    uplink: str = "fp16"  # factors on the wire: fp32 | fp16 | bf16 | int8-block
    zstd_level: int = 3  # -1: no zstd
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = -1  # -1: 5% of steps
    steps: int = 500  # local steps per head over the whole job
    min_lr_ratio: float = 0.0
    batch_size: int = 16  # per head
    seed: int = 0
    mode: str = "sync"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    dtype: str = "float32"
    max_chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        checks = [
            (self.heads >= 1, f"heads must be >= 1, got {self.heads}"),
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.merge_every >= 1, f"merge_every must be >= 1, got {self.merge_every}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.quant in QUANT_KINDS, f"quant must be one of {QUANT_KINDS}, got {self.quant!r}"),
            (self.uplink in UPLINK_CODECS, f"uplink must be one of {UPLINK_CODECS}, got {self.uplink!r}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.a_init in A_INITS, f"a_init must be one of {A_INITS}, got {self.a_init!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (-1 <= self.zstd_level <= 22, f"zstd_level must be in [-1, 22], got {self.zstd_level}"),
            (
                1 << 12 <= self.max_chunk_bytes <= 1 << 26,
                f"max_chunk_bytes must be in [4 KiB, 64 MiB], got {self.max_chunk_bytes}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.warmup_steps < -1:
            raise ValueError(f"warmup_steps must be >= 0, or -1 for 5% of steps; got {self.warmup_steps}")

    @property
    def warmup(self) -> int:
        """Warm-up steps in effect: ``warmup_steps``, or 5% of ``steps`` while it is -1.

        Resolved on use, not stored, so ``dataclasses.replace(job, steps=...)`` keeps it 5%.
        """
        return self.warmup_steps if self.warmup_steps >= 0 else max(1, self.steps // 20)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def rounds(self) -> int:
        """Merges over the job: ``steps // merge_every`` (at least one)."""
        return max(1, self.steps // self.merge_every)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def snapshot_codec(self) -> str:
        return SNAPSHOT_CODEC[self.quant]

    def lte_config(self, head_ids: list[int] | tuple[int, ...], *, wire_rounded: bool = False) -> LTEConfig:
        """The conversion for a process holding ``head_ids``.

        ``wire_rounded``: the process rounds its factors to the uplink codec before each merge
        (a worker does), so ``B', A'`` can be stored in the uplink's dtype without loss.
        """
        import torch

        prev_dtype = (
            {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.uplink) if wire_rounded else None
        )
        return LTEConfig(
            prev_dtype=prev_dtype,
            heads=len(head_ids),
            total_heads=self.heads,
            rank=self.rank,
            alpha=self.alpha,
            reset=self.reset,
            a_init=self.a_init,
            a_init_gain=self.a_init_gain,
            quant=self.quant,
            head_ids=tuple(head_ids),
            seed=self.seed,
        )

    def with_dataset(self, dataset: Any) -> JobConfig:
        """Fill the shape fields from a loaded dataset (fields set by the user win)."""
        return dataclasses.replace(
            self,
            image_size=self.image_size or dataset.image_size,
            in_channels=self.in_channels or dataset.in_channels,
            num_classes=self.num_classes or dataset.output_dim,
            task=self.task or dataset.task,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def job_from_dict(values: dict[str, Any], *, source: str = "config") -> JobConfig:
    """Build a JobConfig, refusing unknown keys by name (a typo must not be silently ignored)."""
    known = {f.name for f in fields(JobConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    return JobConfig(**values)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; keys may use dashes or underscores."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # allow [job] / [server] tables: flatten one level
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    return flat


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job flags shared by lte-sim and lte-server. Defaults are None so a config file can fill them."""
    d = JobConfig()
    g = parser.add_argument_group("job")
    g.add_argument(
        "--model",
        help=f"zoo model (mlp, vit-micro, vit-tiny, vit-s, vit-b, vit-l) or package.module:factory [{d.model}]",
    )
    g.add_argument(
        "--dataset", help=f"digits | fashion-mnist | imagefolder | synthetic-regression [{d.dataset}]"
    )
    g.add_argument("--image-size", type=int, help="input side in pixels [the dataset's]")
    g.add_argument("--patch-size", type=int, help="ViT patch size [zoo default for the image size]")
    g.add_argument("--heads", type=int, help=f"N, LoRA heads in the whole job [{d.heads}]")
    g.add_argument("--rank", type=int, help=f"r, rank of each head [{d.rank}]")
    g.add_argument("--alpha", type=float, help=f"LoRA alpha; scale s = alpha / r [{d.alpha:g}]")
    g.add_argument("--merge-every", type=int, help=f"T, local steps between merges [{d.merge_every}]")
    g.add_argument(
        "--reset", action="store_true", default=None, help="reset variant: B <- 0 after each merge"
    )
    g.add_argument("--a-init", choices=A_INITS, help=f"init of each head's A [{d.a_init}]")
    g.add_argument("--a-init-gain", type=float, help=f"extra factor on A's init scale [{d.a_init_gain:g}]")
    g.add_argument("--quant", choices=QUANT_KINDS, help=f"worker base weights: none | int8 | nf4 [{d.quant}]")
    g.add_argument("--uplink", choices=UPLINK_CODECS, help=f"codec of factors on the wire [{d.uplink}]")
    g.add_argument("--zstd-level", type=int, help=f"zstd level of the uplink, -1 for none [{d.zstd_level}]")
    g.add_argument("--lr", type=float, help=f"peak AdamW learning rate [{d.lr:g}]")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay [{d.weight_decay:g}]")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps [5%% of --steps]")
    g.add_argument(
        "--min-lr-ratio", type=float, help=f"cosine floor as a fraction of --lr [{d.min_lr_ratio:g}]"
    )
    g.add_argument("--steps", type=int, help=f"local steps per head over the job [{d.steps}]")
    g.add_argument("--batch-size", type=int, help=f"samples per head per step [{d.batch_size}]")
    g.add_argument("--seed", type=int, help=f"seed of init, data order and heads [{d.seed}]")
    g.add_argument("--mode", choices=MODES, help=f"aggregation: sync | async | buffered [{d.mode}]")
    g.add_argument("--dtype", choices=DTYPES, help=f"training precision [{d.dtype}]")


def resolve_job(args: argparse.Namespace, file_values: dict[str, Any] | None = None) -> JobConfig:
    """Precedence: command-line flags > config file > defaults."""
    values = {k: v for k, v in (file_values or {}).items() if k in {f.name for f in fields(JobConfig)}}
    for f in fields(JobConfig):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    return job_from_dict(values)
