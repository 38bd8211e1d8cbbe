"""The job configuration: one dataclass for the emulator, the server and (over the wire) the workers."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lte.common.core.hf import context_of, read_config
from lte.common.core.layers import A_INITS, LTEConfig
from lte.common.core.quant import QUANT_KINDS
from lte.common.data.datasets import DATASET_NAMES
from lte.common.data.images import AUGMENTS
from lte.common.data.randaugment import DEFAULT_MAGNITUDE, MAX_MAGNITUDE, RANDAUGMENT_OPS
from lte.common.data.text import check_token_data
from lte.common.job.checks import (
    ConfigError,
    check_choice,
    check_model_name,
    check_range,
    coerce_types,
    flag,
    read_toml,
)
from lte.common.job.models import GPT_PRESETS, MODEL_NAMES
from lte.common.job.precision import PRECISIONS

MODES = ("sync", "async", "buffered")
UPLINK_CODECS = ("fp32", "fp16", "bf16", "int8-block")
SNAPSHOT_CODEC = {"none": "fp32", "int8": "int8-row", "nf4": "nf4"}  # base quantisation -> downlink codec
DTYPES = ("float32", "float64")
HEAD_DATA = ("shard", "iid")  # what each head reads: a fixed 1/N shard, or the whole training set


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
    alpha: float = 64.0  # s = alpha / r = 4; README "Tuning LTE for a new model" has the measured band
    merge_every: int = 10  # T: local steps per round
    reset: bool = False
    a_init: str = "reference"  # the paper authors' A scale, spectral norm sqrt(n / r) (common/core/layers.py)
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
    # compute precision of the local steps: auto (bf16 on CUDA with bf16 support, else fp32) | fp32 |
    # bf16 | fp16 (autocast; factors and AdamW state stay in dtype); a worker's --precision wins
    precision: str = "auto"
    classes: tuple[str, ...] = ()  # class names, filled from the dataset: a worker maps its folders by name
    augment: str = ""  # training augmentation: none | crop-flip; "": the dataset's (crop-flip for folders)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup: float = 0.0  # mixup Beta(a, a) parameter; 0: off
    cutmix: float = 0.0  # CutMix Beta(a, a) parameter; 0: off (with mixup too: one of them per head and step)
    randaugment_ops: int = 0  # RandAugment's N: ops per training image (image folders, shards); 0: off
    randaugment_magnitude: int = DEFAULT_MAGNITUDE  # RandAugment's M on torchvision's 0..30 scale
    context: int = 0  # language models: tokens per sequence; 0: the zoo preset's
    embedding_heads: bool = True  # embeddings get LTE heads; False: full-size replica deltas
    tokenizer: str = ""  # language models: the token data's tokenizer id (filled from the data)
    # what each head of a sample dataset reads (token data is always drawn from the whole file):
    # shard: a fixed 1/N of the training set; iid: the whole set, its own reshuffle per epoch
    head_data: str = "shard"
    # AdamW state at a merge: False keeps each head's moments across merges; True clears them (step,
    # exp_avg, exp_avg_sq of every trainable tensor) each time the trainer commits a merge
    reset_optimizer: bool = False

    def __post_init__(self) -> None:
        self.classes = tuple(str(c) for c in self.classes)  # a TOML list or a proto repeated field
        checks = [
            (self.augment in ("", *AUGMENTS), f"augment must be one of {AUGMENTS}, got {self.augment!r}"),
            (self.heads >= 1, f"heads must be >= 1, got {self.heads}"),
            (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
            (self.merge_every >= 1, f"merge_every must be >= 1, got {self.merge_every}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.alpha > 0, f"alpha must be > 0 (scale s = alpha / r; 0 trains nothing), got {self.alpha}"),
            (self.a_init_gain > 0, f"a_init_gain must be > 0, got {self.a_init_gain}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 <= self.beta1 < 1, f"beta1 must be in [0, 1), got {self.beta1}"),
            (0 <= self.beta2 < 1, f"beta2 must be in [0, 1), got {self.beta2}"),
            (self.eps > 0, f"eps must be > 0, got {self.eps}"),
            (self.image_size >= 0, f"image_size must be >= 0 (0: the dataset's), got {self.image_size}"),
            (self.in_channels >= 0, f"in_channels must be >= 0 (0: the dataset's), got {self.in_channels}"),
            (self.num_classes >= 0, f"num_classes must be >= 0 (0: the dataset's), got {self.num_classes}"),
            (self.patch_size >= 0, f"patch_size must be >= 0 (0: the zoo default), got {self.patch_size}"),
            (self.quant in QUANT_KINDS, f"quant must be one of {QUANT_KINDS}, got {self.quant!r}"),
            (self.uplink in UPLINK_CODECS, f"uplink must be one of {UPLINK_CODECS}, got {self.uplink!r}"),
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.a_init in A_INITS, f"a_init must be one of {A_INITS}, got {self.a_init!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.head_data in HEAD_DATA, f"head_data must be one of {HEAD_DATA}, got {self.head_data!r}"),
            (
                self.precision in PRECISIONS,
                f"precision must be one of {PRECISIONS}, got {self.precision!r}",
            ),
            (
                not (self.dtype == "float64" and self.precision in ("bf16", "fp16")),
                f"precision {self.precision} autocasts float32 only; use dtype float32 or precision fp32",
            ),
            (
                0.0 <= self.label_smoothing < 1.0,
                f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
            ),
            (
                self.mixup >= 0 and self.cutmix >= 0,
                f"mixup and cutmix must be >= 0, got {self.mixup}, {self.cutmix}",
            ),
            (
                0 <= self.randaugment_ops <= len(RANDAUGMENT_OPS),
                f"--randaugment-ops {self.randaugment_ops}: must be in [0, {len(RANDAUGMENT_OPS)}] "
                "(ops per image, drawn from RandAugment's 14; 0: off; 2 is the usual)",
            ),
            (
                0 <= self.randaugment_magnitude <= MAX_MAGNITUDE,
                f"--randaugment-magnitude {self.randaugment_magnitude}: must be in [0, {MAX_MAGNITUDE}] "
                "(torchvision's scale; 9 is the usual)",
            ),
            (-1 <= self.zstd_level <= 22, f"zstd_level must be in [-1, 22], got {self.zstd_level}"),
            (
                1 << 12 <= self.max_chunk_bytes <= 1 << 26,
                f"max_chunk_bytes must be in [4 KiB, 64 MiB], got {self.max_chunk_bytes}",
            ),
        ]
        for f in fields(self):  # inf passes every bound above (lr > 0): a float must be a number
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.context < 0:
            raise ConfigError(f"context must be >= 0 (0: the model's preset), got {self.context}")
        if self.warmup_steps < -1:
            raise ConfigError(f"warmup_steps must be >= 0, or -1 for 5% of steps; got {self.warmup_steps}")

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
        """Rounds each head trains: ``ceil(steps / merge_every)``; the last is shorter when T does not
        divide ``steps`` (``round_steps``), so every head trains exactly ``steps`` local steps."""
        return -(-self.steps // self.merge_every)

    def round_steps(self, steps_done: int) -> int:
        """Local steps of the round a head starts at ``steps_done``: T, or what is left of ``steps``."""
        return max(0, min(self.merge_every, self.steps - steps_done))

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
            embeddings=self.embedding_heads,
        )

    def with_dataset(self, dataset: Any) -> JobConfig:
        """Fill the shape fields from a loaded dataset (fields set by the user win)."""
        return dataclasses.replace(
            self,
            image_size=self.image_size or dataset.image_size,
            in_channels=self.in_channels or dataset.in_channels,
            num_classes=self.num_classes or dataset.output_dim,
            task=self.task or dataset.task,
            classes=self.classes or tuple(dataset.extras.get("classes", ())),
            augment=self.augment or dataset.extras.get("augment", "none"),
            context=self.context or _default_context(self.model, dataset),
            tokenizer=self.tokenizer or getattr(dataset, "tokenizer_id", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML values (``classes`` as a list, so a checkpoint's saved job compares equal)."""
        return {**dataclasses.asdict(self), "classes": list(self.classes)}


def _default_context(model: str, dataset: Any) -> int:
    """A language model's preset context; 0 for other tasks. Raises ValueError when none is known."""
    if getattr(dataset, "task", "") != "lm":
        return 0
    if model.startswith("hf:"):  # the config's positions
        longest = context_of(read_config(model))
        if longest:
            return longest
    key = model.lower().replace("_", "-")
    if key not in GPT_PRESETS:
        raise ValueError(f"model {model!r} has no preset context for --dataset text; pass --context")
    return GPT_PRESETS[key]["context"]


def job_from_dict(values: dict[str, Any], *, source: str = "config") -> JobConfig:
    """Build a JobConfig, refusing unknown keys by name (a typo must not be silently ignored)."""
    known = {f.name for f in fields(JobConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    return JobConfig(**coerce_types(values, JOB_TYPES, source=source))


JOB_TYPES: dict[str, type] = {f.name: type(f.default) for f in fields(JobConfig)}


UPDATE_GUARDS = ("refuse", "clip", "off")  # --update-guard (server/guard.py)
SECRETS = ("token",)  # settings never printed or written to a run's config.toml
MASKED = "<set>"  # a secret's value where settings are printed (a config file holding it means "unset")


def _setting(
    default: Any,
    help: str,
    *,
    group: str = "server",
    choices: tuple[str, ...] = (),
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    note: str = "",
) -> Any:
    """A ServerSettings field: its default, its ``--help`` line (the ``[default]`` note as users
    read it), its argparse group, and the range or choices a value must be in."""
    return field(
        default=default,
        metadata={
            "help": help,
            "group": group,
            "choices": choices,
            "low": low,
            "high": high,
            "low_open": low_open,
            "note": note,
        },
    )


@dataclass(frozen=True)
class ServerSettings:
    """lte-server's own settings (everything that is not the job): one field per ``--flag`` and
    config-file key, in ``lte-server --help`` order.

    argparse (``server/cli.py``), the config file's types (``SERVER_TYPES``), the range checks and
    the dashboard's settings panel are all derived from these fields. Construction checks each
    value against its field's range or choices and raises ConfigError naming the option; checks
    that need the job, the environment or files are ``lte.server.startup.check_server_settings``.
    """

    host: str = _setting("127.0.0.1", "address to listen on; 0.0.0.0 or :: for other machines [127.0.0.1]")
    port: int = _setting(
        50051, "gRPC port, 0 for any free one [50051]", low=0, high=65535, note="0 picks a free one"
    )
    device: str = _setting("cpu", "device of the master weights and merges [cpu]")
    data_dir: str | None = _setting(None, "dataset folder (Fashion-MNIST IDX files, imagefolder root)")
    skip_bad_images: bool = _setting(
        False, "skip (and count) image files that do not decode instead of stopping [stop]"
    )
    loader_workers: int = _setting(
        -1,
        "DataLoader processes decoding streamed images: the server's evaluation uses this many, "
        "--local-workers get it too [0 here, 2 on local workers]",
        low=-1,
        note="-1 means 0 here, 2 on local workers",
    )
    eval_samples: int = _setting(
        0,
        "evaluate on a fixed class-balanced subset of K test samples, 0 for all [0]",
        low=0,
        note="0 for all",
    )
    heads_per_worker: int = _setting(
        0,
        "most heads one worker may lease [N / local workers, or N]",
        low=0,
        note="0 means N / local workers, or N",
    )
    lease_timeout: float = _setting(
        30.0,
        "seconds without a heartbeat before a lease expires [30]",
        low=0,
        low_open=True,
        note="a time in seconds",
    )
    heartbeat_interval: float = _setting(
        5.0, "seconds between worker heartbeats [5]", low=0, low_open=True, note="a time in seconds"
    )
    straggler_factor: float = _setting(
        4.0,
        "move a live worker's heads once it has not pushed for K x the job's median round time "
        "(and at least 2 heartbeats); 0 for never [4]",
        low=0,
        note="x the median round time; 0 turns the rule off",
    )
    max_staleness: int = _setting(8, "async/buffered: refuse pushes staler than this [8]", low=0)
    buffer_size: int = _setting(
        0, "buffered mode: pushes per merge [N/4]", low=0, note="0 means N/4; at most N"
    )
    eval_every: int = _setting(
        -1,
        "evaluate every K versions, 0 for only at the end [auto]",
        low=-1,
        note="0 only at the end, -1 automatic",
    )
    out: str | None = _setting(None, "run folder for metrics.jsonl and model.safetensors [runs/<time>]")
    threads: int = _setting(
        0, "torch CPU threads of the server [torch default]", low=0, note="0 is torch's default"
    )
    rpc_threads: int = _setting(
        0,
        "gRPC handler threads; long-polls never take the last quarter of them [LTE_SERVER_THREADS or 64]",
    )
    local_workers: int = _setting(0, "start K worker processes on loopback and stop them at exit", low=0)
    worker_device: str = _setting("cpu", "device of the local workers [cpu]")
    dashboard_host: str = _setting("127.0.0.1", "address of the web dashboard [127.0.0.1]")
    dashboard_port: int = _setting(
        8080,
        "dashboard port, 0 for any free one, -1 for none [8080]",
        low=-1,
        high=65535,
        note="0 a free one, -1 none",
    )
    dashboard_auth: bool = _setting(False, "the dashboard requires the token too")
    checkpoint_every: int = _setting(
        -1,
        "checkpoint every K versions, 0 for never [rounds/10]",
        low=-1,
        note="0 never, -1 automatic",
    )
    keep_checkpoints: int = _setting(3, "newest checkpoints kept [3]", low=1)
    linger: float = _setting(
        -1.0,
        "seconds to keep serving the final state (dashboard, 'job over' to late workers) after "
        "the job; -1: until Ctrl+C on a terminal with a dashboard, else 0 [-1]",
        low=-1,
        note="seconds; -1 until Ctrl+C on a terminal",
    )
    resume: str | None = _setting(None, "continue from a checkpoint folder or a run folder's newest one")
    overwrite: bool = _setting(
        False, "reuse an --out folder that holds an earlier job's model.safetensors (replacing it)"
    )
    update_guard: str = _setting(
        "refuse",
        "pushes whose per-layer contribution is out of bounds (server/guard.py): refuse them, "
        "clip them to the bound, or merge everything (off) [refuse]",
        choices=UPDATE_GUARDS,
    )
    token: str | None = _setting(
        None,
        "shared secret workers must send, at least 16 visible ASCII characters "
        "(or set LTE_TOKEN, which ps does not show); required off loopback",
        group="security",
    )
    tls_cert: str | None = _setting(None, "PEM certificate of the server (enables TLS)", group="security")
    tls_key: str | None = _setting(None, "PEM private key of the server", group="security")
    tls_ca: str | None = _setting(
        None, "PEM CA that client certificates must chain to (mutual TLS)", group="security"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                note = f" ({meta['note']})" if meta["note"] else ""
                raise ConfigError(f"{flag(f.name)} {value}: must be a finite number{note}")
            if meta["choices"] and value not in meta["choices"]:
                check_choice(f.name, value, meta["choices"])
            if meta["low"] is not None or meta["high"] is not None:
                check_range(
                    f.name,
                    value,
                    low=meta["low"],
                    high=meta["high"],
                    low_open=meta["low_open"],
                    note=meta["note"],
                )
        if self.rpc_threads != 0:
            check_range(
                "rpc_threads",
                self.rpc_threads,
                low=2,
                note="the gRPC server needs at least 2 handler threads",
            )
        if self.heartbeat_interval >= self.lease_timeout:
            raise ConfigError(
                f"--heartbeat-interval {self.heartbeat_interval:g}: must be below --lease-timeout "
                f"{self.lease_timeout:g}, or every lease expires between two heartbeats"
            )
        for key in ("host", "dashboard_host", "device", "worker_device"):
            if not str(getattr(self, key)).strip():
                raise ConfigError(f"{flag(key)} {getattr(self, key)!r}: must not be empty")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> ServerSettings:
        """Settings from plain values (a config file's, with ``SERVER_TYPES``' types); keys that are
        not settings are ignored (the job's). Raises ConfigError naming a value of the wrong type
        or out of range."""
        known = {k: v for k, v in values.items() if k in SERVER_TYPES}
        return cls(**coerce_types(known, SERVER_TYPES, source=source))

    @classmethod
    def resolve(cls, args: argparse.Namespace, file_values: dict[str, Any]) -> ServerSettings:
        """Precedence as the job's: command-line flags > config file > defaults."""
        values = {k: v for k, v in file_values.items() if k in SERVER_TYPES}
        values.update({k: getattr(args, k) for k in SERVER_TYPES if getattr(args, k, None) is not None})
        return cls.from_dict(values)

    def resolved(self, job: JobConfig) -> ServerSettings:
        """The placeholders filled in for ``job`` as the server runs it: ``heads_per_worker`` 0 is
        ceil(N / local workers) (0, no bound, without local workers), ``eval_every`` and
        ``checkpoint_every`` -1 are a tenth of the rounds per head (at least 1); an existing
        ``data_dir`` or TLS file given relative to the working folder becomes absolute, so that the
        run's config.toml (and the resume command printed at Ctrl+C) works from any folder."""
        local = self.local_workers
        tenth = max(1, job.rounds // 10)
        return dataclasses.replace(
            self,
            heads_per_worker=self.heads_per_worker or (-(-job.heads // local) if local else 0),
            eval_every=self.eval_every if self.eval_every >= 0 else tenth,
            checkpoint_every=self.checkpoint_every if self.checkpoint_every >= 0 else tenth,
            data_dir=_absolute(self.data_dir),
            tls_cert=_absolute(self.tls_cert),
            tls_key=_absolute(self.tls_key),
            tls_ca=_absolute(self.tls_ca),
        )

    def to_dict(self) -> dict[str, Any]:
        """Every setting, secrets included (keys are the config file's)."""
        return dataclasses.asdict(self)

    def public(self) -> dict[str, Any]:
        """Settings fit to print or show on the dashboard: a secret that is set reads ``MASKED``."""
        return {k: (MASKED if k in SECRETS and v else v) for k, v in self.to_dict().items()}

    def without_secrets(self) -> dict[str, Any]:
        """Settings fit for a file on disk (a run's config.toml): secrets left out."""
        return {k: v for k, v in self.to_dict().items() if k not in SECRETS}


def _absolute(path: str | None) -> str | None:
    """``path`` made absolute when it names something that exists here; else as given."""
    if not path or not Path(path).exists():
        return path
    return str(Path(path).absolute())


def _plain_type(annotation: str) -> type:
    """``int``, ``float``, ``str`` or ``bool`` of a field annotation such as ``"str | None"``."""
    return {"int": int, "float": float, "str": str, "bool": bool}[annotation.split("|")[0].strip()]


# the type each server key of a config file must have (lte-server's settings; lte-sim accepts and
# ignores them, so that a run's config.toml runs there as it is)
SERVER_TYPES: dict[str, type] = {f.name: _plain_type(str(f.type)) for f in fields(ServerSettings)}

CONFIG_TABLES = ("job", "server")  # the tables a config file may group its keys in


def load_toml(path: str | Path, extra_types: dict[str, type] | None = None) -> dict[str, Any]:
    """Read a TOML config file; keys may use dashes or underscores.

    Values of job keys (and of ``extra_types``' keys) must have the type the key expects.
    Raises ConfigError naming the file, and the key where a value is of the wrong type.
    """
    data = read_toml(path)
    flat: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # the key as the file wrote it, for the duplicate message
    entries = []
    for key, value in data.items():
        if isinstance(value, dict) and key in CONFIG_TABLES:  # [job] / [server] tables: flatten one level
            entries += [(f"{key}.{k}", k, v) for k, v in value.items()]
        elif isinstance(value, dict):
            raise ConfigError(
                f"{path}: key {key!r} holds a table; options take plain values, and the only tables "
                f"are {' and '.join(f'[{t}]' for t in CONFIG_TABLES)}"
            )
        else:
            entries.append((key, key, value))
    for written, key, value in entries:
        name = key.replace("-", "_")
        if name in flat:  # merge-every and merge_every, or the same key in two tables
            raise ConfigError(f"{path}: {spelled[name]} and {written} set the same option {name}; keep one")
        flat[name], spelled[name] = value, written
    return coerce_types(flat, {**JOB_TYPES, **(extra_types or {})}, source=str(path))


def check_job(job: JobConfig) -> None:
    """Start-up checks that need more than the dataclass: the model must be buildable by name.

    Raises ConfigError naming --model or --dataset.
    """
    check_choice("dataset", job.dataset, DATASET_NAMES)
    check_model_name(job.model, MODEL_NAMES)


EXPLAIN_HELP = (
    "print how every parameter and buffer of the model trains (LTE heads, replica, averaged buffer, "
    "frozen, tied), a worker's memory and the bytes per round up and down, then exit"
)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job flags shared by lte-sim and lte-server. Defaults are None so a config file can fill them."""
    d = JobConfig()
    g = parser.add_argument_group("job")
    g.add_argument(
        "--model",
        help="zoo model (mlp, vit-micro, vit-tiny, vit-s, vit-b, vit-l, gpt-micro, gpt-nano, gpt2-small, gpt2-medium) "
        f"or package.module:factory [{d.model}]",
    )
    g.add_argument(
        "--dataset",
        help=f"digits | fashion-mnist | imagefolder | webdataset | synthetic-regression | text (token files) [{d.dataset}]",
    )
    g.add_argument("--image-size", type=int, help="input side in pixels [the dataset's]")
    g.add_argument(
        "--augment",
        choices=AUGMENTS,
        help="training augmentation: none | crop-flip (random resized crop + horizontal flip) "
        "[crop-flip for image folders, else none]",
    )
    g.add_argument(
        "--in-channels",
        type=int,
        choices=(1, 3),
        help="image channels: image folders and shards are read as grayscale (1) or RGB (3) [the dataset's; 3 for folders]",
    )
    g.add_argument(
        "--label-smoothing", type=float, help=f"cross-entropy label smoothing [{d.label_smoothing:g}]"
    )
    g.add_argument("--mixup", type=float, help="mixup with lam ~ Beta(a, a), e.g. 0.8 [off]")
    g.add_argument("--cutmix", type=float, help="CutMix with lam ~ Beta(a, a), e.g. 1.0 [off]")
    g.add_argument(
        "--randaugment-ops",
        type=int,
        metavar="N",
        help="RandAugment on image folders and shards: N ops per training image, e.g. 2 [0: off]",
    )
    g.add_argument(
        "--randaugment-magnitude",
        type=int,
        metavar="M",
        help=f"RandAugment's magnitude, 0..{MAX_MAGNITUDE} as torchvision's [{d.randaugment_magnitude}]",
    )
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
    g.add_argument(
        "--head-data",
        choices=HEAD_DATA,
        help="what each head reads: shard (a fixed 1/N of the training set) | iid (the whole set, "
        f"reshuffled per head and epoch, as the paper's code) [{d.head_data}]",
    )
    g.add_argument(
        "--reset-optimizer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clear the AdamW state (moments and step count) of every head and replica at each merge "
        f"[{'on' if d.reset_optimizer else 'off'}]",
    )
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
    g.add_argument("--dtype", choices=DTYPES, help=f"parameter and optimiser dtype [{d.dtype}]")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="compute precision of the local steps: autocast bf16 | fp16 (loss-scaled) | fp32; auto is "
        f"bf16 on CUDA devices that support it, fp32 elsewhere [{d.precision}]",
    )
    g.add_argument("--context", type=int, help="language models: tokens per sequence [the preset's]")
    g.add_argument(
        "--embedding-heads",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LTE heads on embeddings (--no-embedding-heads: full-size replica deltas) [on]",
    )


def resolve_job(args: argparse.Namespace, file_values: dict[str, Any] | None = None) -> JobConfig:
    """Precedence: command-line flags > config file > defaults."""
    values = {k: v for k, v in (file_values or {}).items() if k in {f.name for f in fields(JobConfig)}}
    for f in fields(JobConfig):
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    return job_from_dict(values)


def check_job_data(job: JobConfig, dataset: Any) -> None:
    """Start-up checks of the data against the resolved job (token files long enough for the
    context, the tokenizer the job names). Raises ValueError naming the file and what to do."""
    if getattr(dataset, "task", "") == "lm":
        check_token_data(job, dataset)
