"""Batches decoded in ``torch.utils.data.DataLoader`` worker processes, ahead of the training step.

A batch is a pure function of its step (``HeadBatches``), so the loader processes compute exactly
what the training process would: the prefetch changes when a batch is decoded, never its content.
The processes are started with ``spawn`` (a gRPC client's threads do not survive ``fork``), live
as long as the iterator, and are restarted only when the trainer's steps jump (a resume, a moved
head). Pinned memory on CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from lte.common.data.datasets import HeadBatches

_log = logging.getLogger("lte.data")


class _StepBatches(TorchDataset):
    """Item k: every stream's batch at its start step + k, concatenated in stream order."""

    def __init__(self, streams: Sequence[HeadBatches], start_steps: Sequence[int], count: int) -> None:
        self.streams, self.start_steps, self.count = list(streams), list(start_steps), count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys = zip(
            *(s.batch(s0 + k) for s, s0 in zip(self.streams, self.start_steps, strict=True)), strict=True
        )
        return torch.tensor(k), torch.cat(xs), torch.cat(ys)


class PrefetchedBatches:
    """``get(steps)``: the stacked batch of each stream at ``steps[i]``, decoded ahead by
    ``workers`` loader processes (0: in this process, no prefetch)."""

    def __init__(
        self, streams: Sequence[HeadBatches], workers: int, *, horizon: int, pin_memory: bool = False
    ) -> None:
        if workers < 0:
            raise ValueError(f"--loader-workers must be >= 0, got {workers}")
        self.streams, self.workers, self.horizon, self.pin_memory = (
            list(streams),
            workers,
            horizon,
            pin_memory,
        )
        self._iter: Iterator | None = None
        self._start: list[int] = []
        self._next = 0

    def get(self, steps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.workers == 0:
            xs, ys = zip(*(s.batch(step) for s, step in zip(self.streams, steps, strict=True)), strict=True)
            return torch.cat(xs), torch.cat(ys)
        expected = [s0 + self._next for s0 in self._start]
        it = self._iter
        if it is None or list(steps) != expected:
            it = self._restart(list(steps))
        try:
            k, x, y = next(it)
        except StopIteration:  # past the horizon (a job extended on resume): start again from here
            it = self._restart(list(steps))
            k, x, y = next(it)
        assert int(k) == self._next, "loader processes returned batches out of order"
        self._next += 1
        return x, y

    def _restart(self, steps: list[int]) -> Iterator:
        self.close()
        count = max(1, self.horizon - min(steps))
        loader = DataLoader(
            _StepBatches(self.streams, steps, count),
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            multiprocessing_context="spawn",
            persistent_workers=False,
            pin_memory=self.pin_memory,
            prefetch_factor=2,
        )
        self._iter, self._start, self._next = iter(loader), steps, 0
        return self._iter

    def close(self) -> None:
        """Stop the loader processes (they also stop when this object is collected)."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            try:
                it._shutdown_workers()
            except RuntimeError as exc:  # a loader process that died while exiting: its work was done
                _log.debug("loader process ended badly at shutdown: %s", exc)


class _EvalBatches(TorchDataset):
    def __init__(self, x, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = k * self.batch_size
        return self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


def eval_batches(
    x, y: torch.Tensor, batch_size: int, workers: int = 0, *, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive test batches in order (the last may be short), decoded by ``workers`` loader
    processes when there are any."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = _EvalBatches(x, y, batch_size)
    if workers == 0 or len(batches) <= 1:
        for k in range(len(batches)):
            yield batches[k]
        return
    yield from DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(batches)),
        multiprocessing_context="spawn",
        pin_memory=pin_memory,
    )
