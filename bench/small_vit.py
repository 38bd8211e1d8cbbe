"""The small ViT of the reference-parity check (issue 21): a pre-LN ViT of 4 blocks, width 128,
4 attention heads, MLP 512, patch 4, a learned position table; 0.8 M parameters at 28 x 28 x 1.

Built by ``--model small_vit:small_vit`` with ``bench/`` on ``PYTHONPATH`` (``bench/parity.py``
does so). Modules are created in a fixed order (per block: norms, qkv, proj, fc1, fc2; then the
patch embedding, blocks, final norm, classifier head, position table), so one seed gives the same
initial weights as the issue's runs of the same architecture. ``affine=False`` builds every
LayerNorm without its weight and bias (the reference's README recommendation, measured by
``bench/parity.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-LN transformer block: ``x + proj(attn(n1(x)))``, then ``x + fc2(gelu(fc1(n2(x))))``.
    Input and output ``[B, T, D]``."""

    def __init__(self, dim: int, heads: int, mlp: int, affine: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(dim, elementwise_affine=affine)
        self.n2 = nn.LayerNorm(dim, elementwise_affine=affine)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.n1(x)).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, T, D / heads]
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class SmallViT(nn.Module):
    """Images ``[B, C, H, H]`` -> logits ``[B, classes]`` (mean-pooled tokens, no class token)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp: int,
        patch: int,
        image_size: int,
        channels: int,
        classes: int,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.patch, self.image_size, self.channels = patch, image_size, channels
        self.embed = nn.Linear(patch * patch * channels, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp, affine) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.head = nn.Linear(dim, classes)
        self.pos = nn.Parameter(torch.zeros((image_size // patch) ** 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p = x.shape[0], self.patch
        g = self.image_size // p
        x = x.reshape(b, self.channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
        x = self.embed(x) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def small_vit(image_size: int, in_channels: int, num_classes: int) -> SmallViT:
    """The issue's small ViT (width 128, 4 blocks, 4 attention heads, MLP 512, patch 4)."""
    return SmallViT(128, 4, 4, 512, 4, image_size, in_channels, num_classes)


def small_vit_plain_norm(image_size: int, in_channels: int, num_classes: int) -> SmallViT:
    """The same ViT with LayerNorms without affine parameters."""
    return SmallViT(128, 4, 4, 512, 4, image_size, in_channels, num_classes, affine=False)


def small_vit_frozen_bias(image_size: int, in_channels: int, num_classes: int) -> SmallViT:
    """The same ViT with every Linear bias frozen at its initial value (``requires_grad=False``),
    as the authors' LTE layers keep theirs; LayerNorms and the position table still train."""
    model = small_vit(image_size, in_channels, num_classes)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.requires_grad_(False)
    return model
