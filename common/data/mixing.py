"""Mixup, CutMix and label smoothing on a stacked multi-head batch, seeded per (seed, head, step).

Mixup (Zhang et al. 2018): x = lam * x + (1 - lam) * x[perm], lam ~ Beta(a, a); CutMix (Yun et al.
2019): a box of area fraction (1 - lam) pasted from x[perm], lam then set to the exact kept area;
with both on, one of the two per head and step with probability 1/2 (timm's ``switch_prob``
default). The loss is lam * CE(y) + (1 - lam) * CE(y[perm]), with ``label_smoothing`` in both.
Each head mixes within its own rows only, with a generator seeded from (seed, head, step), so the
emulator and a worker holding the head draw the same boxes and weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lte.common.data.seeds import generator, mixed_seed

_MIX_SALT = 0x4D1C  # keeps the mixing stream apart from the sample order and crop streams


def mix_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    head_ids: list[int],
    steps: list[int],
    *,
    seed: int,
    mixup: float,
    cutmix: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed x [B, C, H, W], partner labels [B], lam [B]) for a batch whose rows are the heads'
    batches in ``head_ids`` order (``steps[i]`` is head i's step). Mixing is done in place on a copy."""
    if mixup <= 0 and cutmix <= 0:
        return x, y, torch.ones(y.shape[0], dtype=torch.float64)
    per_head = x.shape[0] // len(head_ids)
    x = x.clone()
    partner = y.clone()
    lam = torch.ones(y.shape[0], dtype=torch.float64)
    for i, (head, step) in enumerate(zip(head_ids, steps, strict=True)):
        g = generator(mixed_seed(seed, head, step, _MIX_SALT))
        rows = slice(i * per_head, (i + 1) * per_head)
        perm = torch.randperm(per_head, generator=g) + i * per_head
        use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand((), generator=g) < 0.5))
        alpha = cutmix if use_cutmix else mixup
        beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
        # Beta sampling takes no generator: draw it by inverse transform from a seeded uniform
        u = torch.rand((), generator=g, dtype=torch.float64)
        value = float(_beta_quantile(beta, u))
        if use_cutmix:
            h, w = x.shape[-2:]
            cut = (1.0 - value) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy = int(torch.randint(0, h, (), generator=g))
            cx = int(torch.randint(0, w, (), generator=g))
            top, bottom = max(0, cy - ch // 2), min(h, cy + ch // 2)
            left, right = max(0, cx - cw // 2), min(w, cx + cw // 2)
            source = x[perm].clone()
            x[rows, :, top:bottom, left:right] = source[:, :, top:bottom, left:right]
            value = 1.0 - (bottom - top) * (right - left) / (h * w)
        else:
            x[rows] = value * x[rows] + (1.0 - value) * x[perm]
        partner[rows] = y[perm]
        lam[rows] = value
    return x, partner, lam


def _beta_quantile(beta: torch.distributions.Beta, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of a Beta, numerically on a grid of 4097 points of (0, 1) (resolution 2.4e-4),
    so that the draw comes from a seeded uniform."""
    a, b = float(beta.concentration1), float(beta.concentration0)
    grid = torch.linspace(1e-6, 1 - 1e-6, 4097, dtype=torch.float64)
    pdf = torch.exp((a - 1) * torch.log(grid) + (b - 1) * torch.log1p(-grid))
    cdf = torch.cumsum(pdf, 0)
    cdf = cdf / cdf[-1]
    k = int(torch.searchsorted(cdf, u).clamp(max=grid.numel() - 1))
    return grid[k]


def mixed_loss(
    logits: torch.Tensor, y: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Mean over rows of lam * CE(logits, y) + (1 - lam) * CE(logits, partner), smoothed."""
    ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    if bool((lam == 1).all()):
        return ce.mean()
    ce_partner = F.cross_entropy(logits, partner, reduction="none", label_smoothing=label_smoothing)
    lam = lam.to(logits.device, ce.dtype)  # ce is fp32 under autocast: bf16 logits would round lam
    return (lam * ce + (1 - lam) * ce_partner).mean()
