"""Models users bring, one kind of state each, for the policy tests (``--model tests.gallery_models:<name>``
with the repository root on PYTHONPATH). Factories take (image_size, in_channels, num_classes)."""

from __future__ import annotations

import torch
from torch import nn


def _flat(image_size: int, in_channels: int) -> int:
    return in_channels * image_size * image_size


class Tied(nn.Module):
    """An output Linear sharing an Embedding's weight (GPT-2-style weight tying)."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(_flat(image_size, in_channels), 32)
        self.classes = nn.Embedding(num_classes, 32)
        self.out = nn.Linear(32, num_classes, bias=False)
        self.out.weight = self.classes.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.proj(x.flatten(1))))


def tied(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return Tied(image_size, in_channels, num_classes)


def batchnorm(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    d = _flat(image_size, in_channels)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, num_classes)
    )


def frozen_part(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    d = _flat(image_size, in_channels)
    m = nn.Sequential(nn.Flatten(), nn.LayerNorm(d), nn.Linear(d, 48), nn.GELU(), nn.Linear(48, num_classes))
    m[1].requires_grad_(False)
    return m


def conv(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.GELU(), nn.Flatten(),
        nn.Linear(8 * image_size * image_size, 48), nn.GELU(), nn.Linear(48, num_classes),
    )  # fmt: skip


class MHAClassifier(nn.Module):
    """Image rows as tokens through torch.nn.MultiheadAttention (raw in_proj_weight, Linear-subclass out_proj)."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels * image_size, width)
        self.attn = nn.MultiheadAttention(width, num_heads=4, batch_first=True)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.embed(x.permute(0, 2, 1, 3).reshape(b, h, c * w))
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def mha(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return MHAClassifier(image_size, in_channels, num_classes)


class TinyTransformer(nn.Module):
    """A pre-norm transformer block on image rows: MultiheadAttention (batch_first) and an MLP."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels * image_size, width)
        self.pos = nn.Parameter(torch.zeros(1, image_size, width))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads=4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.embed(x.permute(0, 2, 1, 3).reshape(b, h, c * w)) + self.pos
        u = self.norm1(t)
        t = t + self.attn(u, u, u, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


def transformer(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return TinyTransformer(image_size, in_channels, num_classes)


class SequenceFirst(nn.Module):
    """Refused: its Linears see image rows on dim 0 (sequence-first), not the batch."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels * image_size, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = x.permute(2, 0, 1, 3).reshape(h, b, c * w)  # [rows, batch, features]
        return self.head(self.embed(rows).mean(0))


def sequence_first(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return SequenceFirst(image_size, in_channels, num_classes)


class FailsOnWorkers(nn.Module):
    """Converts and runs on the meta device, then fails on real data: a worker must give its lease back."""

    def __init__(self, image_size: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(_flat(image_size, in_channels), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:
            raise RuntimeError("this model's custom kernel is missing on this machine")
        return self.fc(x.flatten(1))


def fails_on_workers(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    return FailsOnWorkers(image_size, in_channels, num_classes)


WIDTH = 48  # tests change it to emulate a model whose code changed between a run and its resume


def resizable(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    d = _flat(image_size, in_channels)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, WIDTH), nn.GELU(), nn.Linear(WIDTH, num_classes))
