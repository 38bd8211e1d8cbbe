"""A process's share of an LTE job (its heads on ``q(W)``, their optimiser, ``T`` local steps),
the full-training baseline, evaluation and snapshots. The emulator and the worker both use it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lte.common.core.merge import HeadUpdate, ReplicaUpdate
from lte.common.core.model_state import (
    commit_merge,
    export_head_factors,
    load_head_factors,
    lte_layers,
    trainable_parameters,
)
from lte.common.core.outputs import forward_logits, model_context
from lte.common.core.policy import (
    classify_model,
    expect_stacked_batch,
    export_replica_deltas,
    load_master_weights,
    prepare_model,
    prepare_model_on_device,
    uplink_tensors,
)
from lte.common.core.quant import QuantizedTensor, quantize
from lte.common.data.datasets import Dataset, HeadBatches, head_batches, head_shard, own_data_shards
from lte.common.data.images import ImageFiles
from lte.common.data.loader import PrefetchedBatches, eval_batches
from lte.common.data.mixing import mix_heads, mixed_loss
from lte.common.data.text import TokenDataset, check_token_data, evaluate_lm
from lte.common.job.config import JobConfig
from lte.common.job.models import build_model
from lte.common.job.precision import MixedPrecision


def build_job_model(job: JobConfig, seed: int | None = None) -> nn.Module:
    """The plain zoo model of the job, initialised from the job seed (same weights everywhere)."""
    torch.manual_seed(job.seed if seed is None else seed)
    model = build_model(
        job.model,
        image_size=job.image_size,
        in_channels=job.in_channels,
        num_classes=job.num_classes,
        patch_size=job.patch_size or None,
        context=job.context or None,
    )
    config = getattr(model, "config", None)
    if job.context and not hasattr(config, "context"):
        # a language model without the zoo GPT's config.context (a factory's, a transformers
        # model): the job's windows, which evaluation and lte-generate read (model_context)
        vars(model)["lte_context"] = int(job.context)  # a plain attribute (nn.Module's own for an int)
    return model.to(job.torch_dtype)


def linear_weight_names(model: nn.Module, embeddings: bool = True) -> list[str]:
    """Master names of the weights that become LTE layers (the state policy's ``lte heads``; with
    ``embeddings``, ``nn.Embedding`` tables too)."""
    return classify_model(model, embeddings=embeddings).head_names


def make_snapshot(
    master: Mapping[str, torch.Tensor], layer_names: Sequence[str], quant: str, skip: Sequence[str] = ()
) -> dict[str, torch.Tensor | QuantizedTensor]:
    """What workers load: LTE layer weights quantised as ``[m, n]`` matrices (once per version),
    everything else as is; names in ``skip`` (tied aliases: the owner carries them) are left out."""
    layers, skipped = set(layer_names), set(skip)
    return {
        name: quantize(t.detach().flatten(1), quant)
        if quant != "none" and name in layers
        else t.detach().clone()
        for name, t in master.items()
        if name not in skipped
    }


def lr_at(step: int, job: JobConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``job.steps``."""
    warmup = job.warmup
    if step < warmup:
        return job.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, job.steps - warmup))
    floor = job.min_lr_ratio
    return job.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_fn(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (classification; "lm": mean over every token of ``[B, L, V]`` logits), or MSE."""
    if task == "lm":
        return F.cross_entropy(logits.flatten(0, 1), target.flatten())
    if task == "regression":
        # the target keeps its precision: under autocast the logits are bf16 / fp16 (mse_loss then
        # runs in fp32), and casting the target to them would round it
        return F.mse_loss(logits, target.to(torch.promote_types(logits.dtype, target.dtype)))
    return F.cross_entropy(logits, target)


_log = logging.getLogger("lte.eval")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset | TokenDataset,
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    loader_workers: int = 0,
) -> dict[str, float | None]:
    """Test loss (and accuracy for classification; perplexity and bits per byte for "lm") of a
    plain or LTE model in eval mode.

    Streams the test split in batches (image folders decoded by ``loader_workers`` DataLoader
    processes, with progress in the log every tenth); an empty test split gives None metrics and
    a warning, never a loss of 0. ``batch_size`` None: 1000 for in-memory sets; for streamed
    images about 2**20 input values per batch (85 images at 3x64x64, 32 at least), so the peak memory
    of an evaluation is bounded by the image size, not by the test split's.
    """
    if isinstance(dataset, TokenDataset):  # task "lm": perplexity and bits per byte over val tokens
        return dict(evaluate_lm(model, dataset, model_context(model), device=device))
    n = len(dataset.test_y)
    if n == 0:
        _log.warning("the %s test split has no samples: no test metrics", dataset.name)
        return {"test_loss": None, **({"test_accuracy": None} if dataset.task == "classification" else {})}
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    streaming = isinstance(dataset.test_x, ImageFiles)
    if batch_size is None:
        c, h, w = dataset.test_x.shape[1:]
        batch_size = max(32, min(1000, (1 << 20) // (c * h * w))) if streaming else 1000
    pin = torch.device(device).type == "cuda"
    total, loss_sum, correct, logged = 0, 0.0, 0, 0
    for x, y in eval_batches(dataset.test_x, dataset.test_y, batch_size, loader_workers, pin_memory=pin):
        if streaming and 10 * total // n > logged:
            logged = 10 * total // n
            _log.info("evaluating: %d / %d test images", total, n)
        x, y = x.to(device, dtype, non_blocking=True), y.to(device, non_blocking=True)
        out = forward_logits(model, x)
        loss_sum += float(loss_fn(dataset.task, out, y)) * x.shape[0]
        if dataset.task == "classification":
            correct += int((out.argmax(dim=1) == y).sum())
        total += x.shape[0]
    model.train(was_training)
    result: dict[str, float | None] = {"test_loss": loss_sum / max(1, total)}
    if dataset.task == "classification":
        result["test_accuracy"] = correct / max(1, total)
    return result


@dataclass
class RoundStats:
    steps: int
    samples: int
    train_loss: float
    seconds: float
    frozen_cache_bytes: int = 0  # the layers' cached frozen weights at the end of the round


def make_optimizer(params, job: JobConfig) -> torch.optim.Optimizer:
    # foreach: one fused multi-tensor update; per-element math, so vectorised heads stay independent
    return torch.optim.AdamW(
        params,
        lr=job.lr,
        betas=(job.beta1, job.beta2),
        eps=job.eps,
        weight_decay=job.weight_decay,
        foreach=True,
    )


class LocalTrainer:
    """Heads ``head_ids`` of a job, vectorised in one LTE model on one device.

    The cycle per round: ``load_snapshot`` (base ``q(W)`` and replicas of version v),
    ``train_round`` (T steps), ``export_update`` (factors and replica deltas to send), and after
    the server applied them, ``commit`` (``(B', A') <- (B, A)``).
    """

    def __init__(
        self,
        job: JobConfig,
        head_ids: Sequence[int],
        dataset: Dataset | TokenDataset,
        *,
        device: str | torch.device = "cpu",
        steps_done: Sequence[int] | None = None,
        wire_rounded: bool = False,
        base_from_snapshot: bool = False,
        cache_frozen: bool | None = None,
        precision: str | None = None,
        loader_workers: int = 0,
    ) -> None:
        """``base_from_snapshot``: build the model without initialising its base (on the meta
        device, then allocated on ``device``), for a caller that loads a snapshot before training,
        as a worker does; it never holds the full-precision model it would otherwise discard.
        ``cache_frozen``: keep each layer's frozen weight (dequantised, ``B'A'`` folded) in the
        compute dtype for the round instead of rebuilding it twice per step: faster, for one
        ``[m, n]`` per layer (per head where folded) of memory; None: on for CUDA devices only.
        ``precision``: fp32 | bf16 | fp16 | auto (``lte.common.job.precision``); None: the job's.
        ``loader_workers``: DataLoader processes decoding the batches of streamed data ahead of the
        step (0, or in-memory data: in this process)."""
        if not head_ids:
            raise ValueError("a trainer needs at least one head")
        self.job, self.head_ids, self.device = job, list(head_ids), torch.device(device)
        self.task = dataset.task
        lte = job.lte_config(self.head_ids, wire_rounded=wire_rounded)
        if base_from_snapshot:
            with torch.device("meta"):
                plain = build_job_model(job)
            # buffers outside the state_dict never come with a snapshot: only the model's code makes them
            base_from_snapshot = not classify_model(plain).nonpersistent_buffers
        if base_from_snapshot:
            self.model = prepare_model_on_device(plain, lte, self.device)
        else:
            self.model = prepare_model(build_job_model(job), lte).to(self.device)
        self.has_base = not base_from_snapshot
        self.precision = MixedPrecision(job.precision if precision is None else precision, self.device)
        if self.precision.dtype is not None and job.dtype != "float32":
            raise ValueError(
                f"precision {self.precision.precision} autocasts float32 only, and this job trains in "
                f"{job.dtype}; use --precision fp32"
            )
        self.cache_frozen = self.device.type == "cuda" if cache_frozen is None else cache_frozen
        for layer in lte_layers(self.model).values():
            layer.cache_frozen = self.cache_frozen
        self.model.train()
        expect_stacked_batch(self.model, job.batch_size * len(self.head_ids))
        self.optimizer = make_optimizer(trainable_parameters(self.model), job)
        if isinstance(dataset, TokenDataset):  # task "lm"
            check_token_data(job, dataset)
            self.streams = [
                head_batches(dataset, h, job.heads, job.batch_size, job.seed, job.context)
                for h in self.head_ids
            ]
        else:
            shards = (
                own_data_shards(len(dataset.train_y), self.head_ids, job.head_data)
                if dataset.extras.get("own_data")
                else [head_shard(h, job.heads, job.head_data) for h in self.head_ids]
            )
            self.streams = [
                HeadBatches(
                    dataset.train_x, dataset.train_y, h, job.heads, job.batch_size, job.seed, shard_of=shard
                )
                for h, shard in zip(self.head_ids, shards, strict=True)
            ]
        self.batches = PrefetchedBatches(
            self.streams,
            loader_workers if isinstance(getattr(dataset, "train_x", None), ImageFiles) else 0,
            horizon=job.steps,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_done = list(steps_done) if steps_done is not None else [0] * len(self.head_ids)
        self.replica_base: dict[str, torch.Tensor] = {}
        # Heads that continue mid-job (moved from a lost worker) start with empty AdamW moments, so
        # their first updates are full-size sign steps at the current lr: ramp it up again over
        # the job's warm-up, as at the start of the job.
        self.rewarm = self.steps_done[0] > 0 and job.warmup > 0
        self.optimizer_steps = 0

    def lr_now(self) -> float:
        lr = lr_at(self.steps_done[0], self.job)
        if self.rewarm and self.optimizer_steps < self.job.warmup:
            lr *= (self.optimizer_steps + 1) / self.job.warmup
        return lr

    @property
    def layer_names(self) -> list[str]:
        return list(lte_layers(self.model))

    def load_snapshot(self, weights: Mapping[str, torch.Tensor | QuantizedTensor]) -> None:
        """Adopt a new base version: layer weights and replica values (remembered for the deltas)."""
        moved = {k: v.to(self.device) for k, v in weights.items()}
        load_master_weights(self.model, moved)
        self.has_base = True
        self.replica_base = {n: p.detach().clone() for n, p in uplink_tensors(self.model).items()}

    def load_head(self, local_index: int, factors, prev=None) -> None:
        """Continue a head that trained elsewhere from its last factors."""
        load_head_factors(self.model, local_index, factors, prev)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.get(self.steps_done)
        x = x.to(self.device, non_blocking=True)
        if x.is_floating_point():  # token ids stay integers
            x = x.to(self.job.torch_dtype)
        return x, y.to(self.device, non_blocking=True)

    def train_round(self, steps: int | None = None) -> RoundStats:
        """``T`` local steps; every head sees its own shard's next batch each step."""
        if not self.has_base:
            raise RuntimeError("this trainer was built with base_from_snapshot: load_snapshot first")
        steps = self.job.round_steps(self.steps_done[0]) if steps is None else steps
        start = time.perf_counter()
        losses = []
        for _ in range(steps):
            lr = self.lr_now()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = self._batch()
            job = self.job
            with self.precision.autocast():
                if self.task == "classification" and (job.mixup or job.cutmix or job.label_smoothing):
                    x, partner, lam = mix_heads(
                        x,
                        y,
                        self.head_ids,
                        self.steps_done,
                        seed=job.seed,
                        mixup=job.mixup,
                        cutmix=job.cutmix,
                    )
                    loss = mixed_loss(forward_logits(self.model, x), y, partner, lam, job.label_smoothing)
                else:
                    loss = loss_fn(
                        self.task, forward_logits(self.model, x), y
                    )  # mean over the stacked batch = mean over heads
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.step(loss, self.optimizer)
            self.optimizer_steps += 1
            losses.append(loss.detach())
            self.steps_done = [s + 1 for s in self.steps_done]
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        samples = steps * self.job.batch_size * len(self.head_ids)
        return RoundStats(steps, samples, mean_loss, time.perf_counter() - start, self.frozen_cache_bytes)

    @property
    def frozen_cache_bytes(self) -> int:
        """Bytes held by the layers' cached frozen weights (0 with the cache off)."""
        return sum(layer.frozen_cache_nbytes for layer in lte_layers(self.model).values())

    def export_update(self) -> tuple[list[HeadUpdate], ReplicaUpdate]:
        heads = [HeadUpdate(h, export_head_factors(self.model, i)) for i, h in enumerate(self.head_ids)]
        return heads, ReplicaUpdate(len(self.head_ids), export_replica_deltas(self.model, self.replica_base))

    def commit(self) -> None:
        """The server merged this round: ``(B', A') <- (B, A)`` in every layer. With the job's
        ``reset_optimizer`` the AdamW state (step count, first and second moments) of every
        trainable tensor is cleared as well, so the next round starts Adam afresh from the merged
        point: the authors' code (github minyoungg/LTE, ``lte/misc/merge.py``) sets
        ``MergeCondition.reset_opt = True`` for its training loop to do this. The learning-rate
        schedule goes on by the heads' step counts."""
        commit_merge(self.model)
        if self.job.reset_optimizer:
            self.optimizer.state.clear()

    @torch.no_grad()
    def discard_round(self) -> None:
        """The server refused this round's push (``Refusal.OUTLIER``): go back to what it holds.

        Each head's factors return to its last merged ``B', A'`` (a head never merged keeps its ``A``:
        its ``A'`` is unknown to the server and ``B' = 0`` makes it irrelevant there); replicas return
        to the snapshot's values. The steps stay taken: the next round trains on new batches."""
        for layer in lte_layers(self.model).values():
            layer.lora_B.copy_(layer.lora_B_prev.to(layer.lora_B.dtype))
            for i in range(layer.heads):
                if bool(layer.lora_A_prev[i].any()):
                    layer.lora_A[i].copy_(layer.lora_A_prev[i].to(layer.lora_A.dtype))
            layer.invalidate_frozen()
        for name, p in uplink_tensors(self.model).items():
            if name in self.replica_base:
                p.copy_(self.replica_base[name])

    @torch.no_grad()
    def keep_heads(self, keep: Sequence[int]) -> None:
        """Train only the local heads ``keep`` (local indices) from now on: their factors, last-merged
        factors, data streams and AdamW moments carry over exactly; the others are dropped (moved away)."""
        if (
            not keep
            or sorted(set(keep)) != sorted(keep)
            or not all(0 <= i < len(self.head_ids) for i in keep)
        ):
            raise ValueError(f"keep must name distinct local heads of {len(self.head_ids)}, got {list(keep)}")
        index = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        replaced: dict[nn.Parameter, nn.Parameter] = {}
        for layer in lte_layers(self.model).values():
            for name in ("lora_A", "lora_B"):
                old = getattr(layer, name)
                replaced[old] = nn.Parameter(old.detach()[index].clone(), requires_grad=old.requires_grad)
                setattr(layer, name, replaced[old])
            layer.lora_A_prev = layer.lora_A_prev[index].clone()
            layer.lora_B_prev = layer.lora_B_prev[index].clone()
            layer.heads = len(keep)
            layer.invalidate_frozen()
        old_state = self.optimizer.state
        self.optimizer = make_optimizer(trainable_parameters(self.model), self.job)
        originals = {new: old for old, new in replaced.items()}
        for p in trainable_parameters(self.model):
            old = originals.get(p, p)
            if old not in old_state:
                continue
            self.optimizer.state[p] = {
                k: v[index].clone() if old is not p and torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in old_state[old].items()
            }
        self.head_ids = [self.head_ids[i] for i in keep]
        self.streams = [self.streams[i] for i in keep]
        self.batches.close()  # its loader processes prefetch for the old heads
        self.batches = PrefetchedBatches(
            self.streams,
            self.batches.workers,
            horizon=self.batches.horizon,
            pin_memory=self.batches.pin_memory,
        )
        self.steps_done = [self.steps_done[i] for i in keep]
        expect_stacked_batch(self.model, self.job.batch_size * len(self.head_ids))

    @torch.no_grad()
    def forget_merges(self, local_indices: Sequence[int]) -> None:
        """The server holds no merge of these heads: their ``B', A'`` become zero, as on its side."""
        for layer in lte_layers(self.model).values():
            for i in local_indices:
                layer.lora_A_prev[i].zero_()
                layer.lora_B_prev[i].zero_()
            layer.invalidate_frozen()
