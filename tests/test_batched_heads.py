"""Few large kernels (issue 14), each pinned in float64 against the plain computation it replaces:
the LTE layer's heads batched against docs/design.md section 2 head by head, and the grouped server merge
against the per-layer one."""

from __future__ import annotations

import pytest
import torch

from lte.common.core.layers import LTELinear

F64 = dict(rtol=1e-12, atol=1e-12)


def _layer(quant: str, heads: int, merged: bool, bias: bool = True) -> LTELinear:
    torch.manual_seed(1)
    layer = LTELinear(9, 7, bias=bias, heads=heads, rank=3, alpha=6.0, quant=quant, dtype=torch.float64)
    layer.set_base_weight(torch.randn(7, 9, dtype=torch.float64))
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        if bias:
            layer.bias.normal_()
    if merged:  # B', A' = these; then move B, A on so that both low-rank terms are live
        layer.commit()
        with torch.no_grad():
            layer.lora_A.add_(torch.randn_like(layer.lora_A))
            layer.lora_B.add_(torch.randn_like(layer.lora_B))
    return layer


def _grads(layer: LTELinear, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    params = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.bias) if p is not None]
    return y.detach(), [x.grad.clone(), *params]


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("rows_per_head", [2, 40])  # 2: B'A' as a low-rank term; 40: folded into W
def test_batched_heads_equal_the_per_head_reference_in_float64(quant, heads, merged, rows_per_head):
    layer = _layer(quant, heads, merged)
    x = torch.randn(heads * rows_per_head, 9, dtype=torch.float64)
    y, grads = _grads(layer, x, layer)
    y_ref, grads_ref = _grads(layer, x, layer.reference_forward)
    torch.testing.assert_close(y, y_ref, **F64)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **F64)
    if merged:  # the low-rank terms do move y: the check is not comparing W x with W x
        plain = layer.base_weight(torch.float64)
        assert not torch.allclose(y, x @ plain.T + layer.bias, **F64)


def test_eval_and_a_sequence_batch_equal_the_reference():
    layer = _layer("int8", 2, merged=True, bias=False)
    x = torch.randn(4, 5, 9, dtype=torch.float64)  # [batch, tokens, features]: heads split the batch
    torch.testing.assert_close(layer(x), layer.reference_forward(x), **F64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.reference_forward(x), **F64)


@pytest.mark.parametrize("heads_per_push", [1, 3])
@pytest.mark.parametrize(
    "add, chunk_bytes", [("bmm", 1 << 28), ("bmm", 700), ("addmm", 1 << 28)]
)  # 700 B: one layer per chunk
def test_the_grouped_merge_equals_the_per_layer_merge_in_float64(heads_per_push, add, chunk_bytes):
    from lte.common.core.merge import merge_head_deltas, merge_layers_grouped

    torch.manual_seed(2)
    shapes = [(6, 5), (5, 6), (6, 5), (4, 4), (6, 5), (5, 6)]  # groups of 3, 2 and 1 layers
    r = 2
    weights = [torch.randn(s, dtype=torch.float64) for s in shapes]
    factors, head_weights = [], []
    for m, n in shapes:
        terms = []
        for k in range(heads_per_push):
            merged = k != 1  # head 1 never merged: no primed factors
            terms.append(
                (
                    torch.randn(m, r, dtype=torch.float64),
                    torch.randn(r, n, dtype=torch.float64),
                    torch.randn(m, r, dtype=torch.float64) if merged else None,
                    torch.randn(r, n, dtype=torch.float64) if merged else None,
                )
            )
        factors.append(terms)
        head_weights.append([0.25 / (k + 1) for k in range(heads_per_push)])  # per-head weights (async)
    per_layer = [w.clone() for w in weights]
    for w, terms, hw in zip(per_layer, factors, head_weights, strict=True):
        merge_head_deltas(w, terms, hw)
    grouped = [w.clone() for w in weights]
    merge_layers_grouped(grouped, factors, head_weights, add=add, max_delta_bytes=chunk_bytes)
    for g, p, w in zip(grouped, per_layer, weights, strict=True):
        torch.testing.assert_close(g, p, **F64)
        assert not torch.allclose(g, w)  # it did merge something
    # the sync case (one weight for all heads) too, where merge_head_deltas takes its GEMM-only path
    same = [[0.125] * heads_per_push for _ in shapes]
    per_layer, grouped = [w.clone() for w in weights], [w.clone() for w in weights]
    for w, terms, hw in zip(per_layer, factors, same, strict=True):
        merge_head_deltas(w, terms, hw)
    merge_layers_grouped(grouped, factors, same, add=add, max_delta_bytes=chunk_bytes)
    for g, p in zip(grouped, per_layer, strict=True):
        torch.testing.assert_close(g, p, **F64)


def test_apply_updates_grouped_or_per_layer_give_the_same_master_over_rounds():
    from lte.common.core.merge import HeadUpdate, apply_updates

    torch.manual_seed(3)
    shapes = {"a.weight": (6, 5), "b.weight": (6, 5), "c.weight": (5, 6)}
    start = {name: torch.randn(s, dtype=torch.float64) for name, s in shapes.items()}
    masters = {g: {n: t.clone() for n, t in start.items()} for g in (False, True)}
    prevs: dict[bool, dict] = {False: {}, True: {}}
    for round_ in range(3):
        updates = [
            HeadUpdate(
                h,
                {
                    n: (torch.randn(m, 2, dtype=torch.float64), torch.randn(2, k, dtype=torch.float64))
                    for n, (m, k) in shapes.items()
                },
            )
            for h in range(2 if round_ else 1)  # head 1 joins in round 1: no primed factors yet
        ]
        for grouped in (False, True):
            apply_updates(
                masters[grouped], prevs[grouped], updates, [0.5] * len(updates), scale=3.0, grouped=grouped
            )
    for name in shapes:
        torch.testing.assert_close(masters[True][name], masters[False][name], **F64)
        assert not torch.allclose(masters[True][name], start[name])
