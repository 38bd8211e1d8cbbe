"""A process's share of an LTE job (its heads on ``q(W)``, their optimiser, ``T`` local steps),
the full-training baseline, evaluation and snapshots. The emulator and the worker both use it."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lte.common.config import JobConfig
from lte.common.data import Dataset, HeadBatches, iterate_eval
from lte.common.lte import (
    HeadUpdate,
    ReplicaUpdate,
    commit_merge,
    export_head_factors,
    export_replica_deltas,
    load_head_factors,
    load_master_weights,
    lte_layers,
    prepare_model,
    prepare_model_on_device,
    replica_parameters,
    trainable_parameters,
)
from lte.common.models import build_model
from lte.common.quant import QuantizedTensor, quantize


def build_job_model(job: JobConfig, seed: int | None = None) -> nn.Module:
    """The plain zoo model of the job, initialised from the job seed (same weights everywhere)."""
    torch.manual_seed(job.seed if seed is None else seed)
    model = build_model(
        job.model,
        image_size=job.image_size,
        in_channels=job.in_channels,
        num_classes=job.num_classes,
        patch_size=job.patch_size or None,
    )
    return model.to(job.torch_dtype)


def linear_weight_names(model: nn.Module) -> list[str]:
    """Master names of the weights that become LTE layers (every plain nn.Linear)."""
    return [f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear]


def make_snapshot(
    master: Mapping[str, torch.Tensor], layer_names: Sequence[str], quant: str
) -> dict[str, torch.Tensor | QuantizedTensor]:
    """What workers load: LTE layer weights quantised (once per version), everything else as is."""
    layers = set(layer_names)
    return {
        name: quantize(t.detach(), quant) if quant != "none" and name in layers else t.detach().clone()
        for name, t in master.items()
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
    if task == "regression":
        return F.mse_loss(logits, target.to(logits.dtype))
    return F.cross_entropy(logits, target)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 1000, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Test loss (and accuracy for classification) of a plain or LTE model in eval mode."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in iterate_eval(dataset.test_x, dataset.test_y, batch_size):
        x, y = x.to(device, dtype), y.to(device)
        out = model(x)
        loss_sum += float(loss_fn(dataset.task, out, y)) * x.shape[0]
        if dataset.task == "classification":
            correct += int((out.argmax(dim=1) == y).sum())
        total += x.shape[0]
    model.train(was_training)
    result = {"test_loss": loss_sum / max(1, total)}
    if dataset.task == "classification":
        result["test_accuracy"] = correct / max(1, total)
    return result


@dataclass
class RoundStats:
    steps: int
    samples: int
    train_loss: float
    seconds: float


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
        dataset: Dataset,
        *,
        device: str | torch.device = "cpu",
        steps_done: Sequence[int] | None = None,
        wire_rounded: bool = False,
        base_from_snapshot: bool = False,
        cache_frozen: bool = False,
    ) -> None:
        """``base_from_snapshot``: build the model without initialising its base (on the meta
        device, then allocated on ``device``), for a caller that loads a snapshot before training,
        as a worker does; it never holds the full-precision model it would otherwise discard.
        ``cache_frozen``: keep each layer's frozen weight (dequantised, ``B'A'`` folded) in the
        compute dtype for the round instead of rebuilding it twice per step: faster, for one
        ``[m, n]`` per layer (per head where folded) of memory."""
        if not head_ids:
            raise ValueError("a trainer needs at least one head")
        self.job, self.head_ids, self.device = job, list(head_ids), torch.device(device)
        self.task = dataset.task
        lte = job.lte_config(self.head_ids, wire_rounded=wire_rounded)
        if base_from_snapshot:
            with torch.device("meta"):
                plain = build_job_model(job)
            self.model = prepare_model_on_device(plain, lte, self.device)
        else:
            self.model = prepare_model(build_job_model(job), lte).to(self.device)
        self.has_base = not base_from_snapshot
        for layer in lte_layers(self.model).values():
            layer.cache_frozen = cache_frozen
        self.model.train()
        self.optimizer = make_optimizer(trainable_parameters(self.model), job)
        self.streams = [
            HeadBatches(dataset.train_x, dataset.train_y, h, job.heads, job.batch_size, job.seed)
            for h in self.head_ids
        ]
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
        self.replica_base = {n: p.detach().clone() for n, p in replica_parameters(self.model).items()}

    def load_head(self, local_index: int, factors, prev=None) -> None:
        """Continue a head that trained elsewhere from its last factors."""
        load_head_factors(self.model, local_index, factors, prev)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(
            *(s.batch(step) for s, step in zip(self.streams, self.steps_done, strict=True)), strict=True
        )
        x = torch.cat(xs).to(self.device, self.job.torch_dtype, non_blocking=True)
        return x, torch.cat(ys).to(self.device, non_blocking=True)

    def train_round(self, steps: int | None = None) -> RoundStats:
        """``T`` local steps; every head sees its own shard's next batch each step."""
        if not self.has_base:
            raise RuntimeError("this trainer was built with base_from_snapshot: load_snapshot first")
        steps = self.job.merge_every if steps is None else steps
        start = time.perf_counter()
        losses = []
        for _ in range(steps):
            lr = self.lr_now()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = self._batch()
            loss = loss_fn(self.task, self.model(x), y)  # mean over the stacked batch = mean over heads
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.optimizer_steps += 1
            losses.append(loss.detach())
            self.steps_done = [s + 1 for s in self.steps_done]
        mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        samples = steps * self.job.batch_size * len(self.head_ids)
        return RoundStats(steps, samples, mean_loss, time.perf_counter() - start)

    def export_update(self) -> tuple[list[HeadUpdate], ReplicaUpdate]:
        heads = [HeadUpdate(h, export_head_factors(self.model, i)) for i, h in enumerate(self.head_ids)]
        return heads, ReplicaUpdate(len(self.head_ids), export_replica_deltas(self.model, self.replica_base))

    def commit(self) -> None:
        commit_merge(self.model)

    @torch.no_grad()
    def forget_merges(self, local_indices: Sequence[int]) -> None:
        """The server holds no merge of these heads: their ``B', A'`` become zero, as on its side."""
        for layer in lte_layers(self.model).values():
            for i in local_indices:
                layer.lora_A_prev[i].zero_()
                layer.lora_B_prev[i].zero_()
            layer.invalidate_frozen()
