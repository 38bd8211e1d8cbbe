"""Few large kernels (issue 14), each pinned in float64 against the plain computation it replaces:
the LTE layer's heads batched against DESIGN section 2 head by head, and the grouped server merge
against the per-layer one."""

from __future__ import annotations

import pytest
import torch

from lte.common.lte import LTELinear

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
