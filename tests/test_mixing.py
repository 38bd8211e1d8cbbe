"""Mixup, CutMix and label smoothing: seeded per (seed, head, step), whatever heads share a process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lte.common.data.mixing import mix_heads, mixed_loss
from lte.common.job.config import JobConfig


def batch(heads: int, per_head: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(heads * per_head, 3, 8, 8, generator=g), torch.arange(heads * per_head) % 5


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_a_heads_mixing_depends_on_seed_head_and_step_only(mixup: float, cutmix: float) -> None:
    x, y = batch(2)
    both = mix_heads(x, y, [3, 7], [5, 5], seed=1, mixup=mixup, cutmix=cutmix)
    alone = mix_heads(x[6:], y[6:], [7], [5], seed=1, mixup=mixup, cutmix=cutmix)  # head 7 in another process
    for a, b in zip(both, alone, strict=True):
        assert torch.equal(a[6:], b)
    later = mix_heads(x, y, [3, 7], [6, 6], seed=1, mixup=mixup, cutmix=cutmix)
    assert not torch.equal(later[0], both[0])
    assert torch.equal(x, batch(2)[0])  # the input is not changed in place
    lam = both[2]
    assert ((lam > 0) & (lam <= 1)).all() and (lam < 1).any()


def test_cutmix_lam_is_the_kept_area_and_rows_come_from_the_partner() -> None:
    x, y = batch(1, per_head=8)
    mixed, partner, lam = mix_heads(x, y, [0], [0], seed=0, mixup=0.0, cutmix=1.0)
    changed = (mixed != x).any(dim=1)  # [B, H, W] pixels taken from another row
    kept = 1 - changed.double().mean(dim=(1, 2))
    fixed_points = partner == y  # a row paired with itself changes nothing
    assert torch.allclose(kept[~fixed_points], lam[~fixed_points], atol=1e-9)


def test_mixed_loss_is_the_lam_weighted_cross_entropy_with_smoothing() -> None:
    logits = torch.randn(4, 5, dtype=torch.float64)
    y, partner = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    lam = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    expected = (
        lam * F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
        + (1 - lam) * F.cross_entropy(logits, partner, reduction="none", label_smoothing=0.1)
    ).mean()
    torch.testing.assert_close(mixed_loss(logits, y, partner, lam, 0.1), expected)
    plain = mixed_loss(logits, y, partner, torch.ones(4, dtype=torch.float64), 0.0)
    torch.testing.assert_close(plain, F.cross_entropy(logits, y))


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        JobConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="mixup and cutmix must be >= 0"):
        JobConfig(mixup=-1)
