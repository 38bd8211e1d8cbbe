"""An LTE model's state by name: its LTE layers keyed by their master weight's name, each local
head's factors (export, load, commit after a merge), the replicas, and the plain (master-style)
state dict. The worker, the trainer and the emulator read and write a converted model through these.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lte.common.core.layers import LTELinear, LTETiedLinear
from lte.common.core.merge import Factors


# -- an LTE model's layers and replicas, by name ---------------------------------------------
def _module_path(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def lte_layers(model: nn.Module) -> dict[str, LTELinear]:
    """Every LTE layer, keyed by the master name of its weight (``blocks.0.attn.qkv.weight``,
    ``blocks.0.attn.in_proj_weight``)."""
    out: dict[str, LTELinear] = {}
    for name, m in model.named_modules():
        if isinstance(m, LTELinear):
            if m.master_attr:
                parent = name.rpartition(".")[0]
                out[f"{parent}.{m.master_attr}" if parent else m.master_attr] = m
            else:
                out[f"{name}.weight" if name else "weight"] = m
    return out


def replica_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters outside the heads, under their plain-model names (a tie's owner once)."""
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and not name.endswith(("lora_A", "lora_B"))
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def export_head_factors(model: nn.Module, local_index: int) -> dict[str, Factors]:
    """Local head ``local_index``'s current ``(B, A)`` per layer (detached copies)."""
    return {
        name: tuple(t.detach().clone() for t in m.wire_factors(local_index))  # type: ignore[misc]
        for name, m in lte_layers(model).items()
    }


@torch.no_grad()
def commit_merge(model: nn.Module) -> None:
    """Every LTE layer: ``(B', A') <- (B, A)`` (the worker's half of a merge)."""
    for layer in lte_layers(model).values():
        layer.commit()


@torch.no_grad()
def load_head_factors(
    model: nn.Module,
    local_index: int,
    factors: Mapping[str, Factors],
    prev: Mapping[str, Factors] | None = None,
) -> None:
    """Continue a head elsewhere: set its current factors (and its last-merged ones, default the same),
    given as ``export_head_factors`` gives them (the wire's layout)."""
    prev = factors if prev is None else prev
    for name, layer in lte_layers(model).items():
        b, a = factors[name]
        bp, ap = prev[name]
        if layer.transposed:  # (A^T, B^T) on the wire
            b, a, bp, ap = a.mT, b.mT, ap.mT, bp.mT
        layer.lora_B[local_index].copy_(b)
        layer.lora_A[local_index].copy_(a)
        layer.lora_B_prev[local_index].copy_(bp)
        layer.lora_A_prev[local_index].copy_(ap)
        layer.has_prev = True
        layer.invalidate_frozen()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The master-style state of an LTE model: base ``W`` per layer (dequantised, in the plain
    model's shape) plus everything else under the plain model's names."""
    out: dict[str, torch.Tensor] = {}
    layers = lte_layers(model)
    paths = {name for name, m in model.named_modules() if isinstance(m, LTELinear)}
    for name, t in model.state_dict().items():
        if _module_path(name) in paths and name.rpartition(".")[2] != "bias":
            continue
        out[name] = t.detach().clone()
    for name, layer in layers.items():
        out[name] = layer.master_weight().detach().clone()
    for path, m in model.named_modules():  # a tied output layer: the plain model's alias, equal values
        if isinstance(m, LTETiedLinear):
            out[f"{path}.weight"] = m.embedding.master_weight().detach().clone()
    return out
