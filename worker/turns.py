"""The heads of a worker's lease as turns: groups of at most its room, each vectorised in one
``LocalTrainer`` and trained one after the other. When the lease changes (a head moved away or
added, a new lease after a restart or an expiry) the turns are regrouped without touching the
state of the heads that stay.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import torch

from lte.common.core.quant import QuantizedTensor
from lte.common.data.datasets import Dataset
from lte.common.data.text import TokenDataset
from lte.common.job.config import JobConfig
from lte.common.job.trainer import LocalTrainer, RoundStats
from lte.common.wire.protocol import group_head_factors
from lte.proto import parameter_server_pb2 as pb


def turn_groups(head_ids: list[int], room: int) -> list[list[int]]:
    """Heads in groups of at most ``room``, trained one group after the other."""
    return [head_ids[i : i + room] for i in range(0, len(head_ids), max(1, room))]


@dataclass
class Turn:
    """Heads this worker trains together (at most its room), vectorised in one ``LocalTrainer``.
    A worker holding more heads than its room trains its turns one after the other."""

    trainer: LocalTrainer
    last_base: int = -1  # the version its last accepted push trained on (sync: one push per version)

    @property
    def head_ids(self) -> list[int]:
        return self.trainer.head_ids

    def unfinished(self, job: JobConfig) -> bool:
        return job.round_steps(self.trainer.steps_done[0]) > 0


@dataclass(frozen=True)
class TrainerOptions:
    """The worker's flags for every trainer it builds: ``precision`` (None: the job's),
    ``cache_frozen`` (None: on for CUDA devices only), ``loader_workers`` (0: batches in-process)."""

    device: torch.device
    precision: str | None = None
    cache_frozen: bool | None = None
    loader_workers: int = 0

    def build(
        self, job: JobConfig, dataset: Dataset | TokenDataset, head_ids: list[int], steps_done: list[int]
    ) -> LocalTrainer:
        """A turn's trainer for ``head_ids`` at ``steps_done``, its base left for the next pull."""
        return LocalTrainer(
            job,
            head_ids,
            dataset,
            device=self.device,
            steps_done=steps_done,
            wire_rounded=True,  # the worker rounds the factors to the uplink codec before each commit
            base_from_snapshot=True,  # a pull brings the base: never build an fp32 copy
            precision=self.precision,
            cache_frozen=self.cache_frozen,
            loader_workers=self.loader_workers,
        )


def pushed_share(stats: RoundStats, trained: int, pushed: int) -> RoundStats:
    """The round's ``stats`` for the ``pushed`` heads of the ``trained`` ones it counted: a head moved
    away between the training and the push (the lease adopted the server's view) is not pushed, so its
    samples are not claimed (``PushHeader.samples``: samples seen by the heads of this push).
    ``steps`` are per head and stay; ``train_loss`` stays the mean over every head trained (the
    trainer keeps no per-head loss). ``ValueError`` unless ``0 < pushed <= trained``."""
    if not 0 < pushed <= trained:
        raise ValueError(f"pushed heads must be in [1, {trained}], got {pushed}")
    return replace(stats, samples=stats.samples * pushed // trained)


def load_pulled(
    turns: list[Turn], weights: dict[str, torch.Tensor | QuantizedTensor], factors: dict[str, torch.Tensor]
) -> None:
    """Load a pulled snapshot's ``weights`` (none when the pull brought no newer version) into every
    turn, and each moved head's ``factors`` (by tensor name) into the turn that trains the head."""
    if weights:
        for turn in turns:
            turn.trainer.load_snapshot(weights)
    for h, layers in group_head_factors(factors).items():
        for turn in turns:
            if h in turn.head_ids:
                turn.trainer.load_head(turn.head_ids.index(h), layers)


def regroup_turns(
    turns: list[Turn],
    heads: list[pb.HeadAssignment],
    room: int,
    *,
    fresh: bool,
    build: Callable[[list[int], list[int]], LocalTrainer],
    trained_elsewhere: Collection[int] = (),
) -> tuple[list[Turn], list[int] | None]:
    """The turns that hold exactly the lease's ``heads``: the heads moved away are dropped (the
    others keep their state exactly) and new heads get new turns (``build(head_ids, steps_done)``
    makes their trainer), those at the same step together, at most ``room`` to a turn. ``fresh``:
    a new lease on the same heads (server restart, expiry), whose view of steps and merges wins.
    ``trained_elsewhere``: held heads whose round moved on at the server since this worker's view
    (moved away, trained by another worker, moved back): their local state is stale, so they are
    dropped from their turns and come back as new heads, factors pulled.

    Returns the turns and the heads whose factors the next pull must bring, or None when no pull is
    needed (no new turn and not ``fresh``; otherwise the new turns need the base, pulled whole)."""
    held = {h.head_id: h for h in heads}
    kept: list[Turn] = []
    for turn in turns:
        stay = [i for i, h in enumerate(turn.head_ids) if h in held and h not in trained_elsewhere]
        if not stay:
            continue
        if len(stay) < len(turn.head_ids):
            turn.trainer.keep_heads(stay)
        if fresh:  # a new lease on the same heads (server restart, expiry): the server's view wins
            turn.trainer.steps_done = [held[h].steps_done for h in turn.head_ids]
            turn.trainer.forget_merges([i for i, h in enumerate(turn.head_ids) if not held[h].has_factors])
            turn.last_base = -1
        kept.append(turn)
    known = {h for t in kept for h in t.head_ids}
    new = [h for h in heads if h.head_id not in known]
    # heads at the same step train together (one lr schedule per turn), at most `room` at a time
    by_step: dict[int, list[pb.HeadAssignment]] = {}
    for h in new:
        by_step.setdefault(h.steps_done, []).append(h)
    for group in by_step.values():
        for ids in turn_groups([h.head_id for h in group], room):
            kept.append(Turn(build(ids, [held[h].steps_done for h in ids])))
    if not (new or fresh):
        return kept, None
    moved = [h.head_id for h in new if h.has_factors] + (
        [h for h in known if held[h].has_factors] if fresh else []
    )
    return kept, moved
