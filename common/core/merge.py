"""The LTE merge over tensors: the arithmetic the emulator, the parameter server and
``LTELinear.merge`` share (docs/design.md section 2).

Scale ``s = alpha / r``; ``N`` heads in the whole job. A merge folds every head's progress since its
last merge into the master weight ``W [m, n]``:

    W <- W + (s / N) * sum_i (B_i A_i - B'_i A'_i)        then (B'_i, A'_i) <- (B_i, A_i)

with ``B_i [m, r]``, ``A_i [r, n]``; async and buffered modes replace ``1 / N`` by staleness
weights. Replicas (every other trainable parameter) merge as weighted sums of their deltas.
Nothing here knows a model: every function takes tensors keyed by the master's names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (B [m, r], A [r, n])


# -- tensor-level merge: shared by LTELinear.merge, the emulator and the parameter server ----
@torch.no_grad()
def merge_head_deltas(
    weight: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    weights: Sequence[float],
) -> None:
    """``W += sum_k w_k (B_k A_k - B'_k A'_k)``; the weights already hold ``s / N``.

    ``factors[k] = (B_k [m, r], A_k [r, n], B'_k, A'_k)``, the last two ``None`` for a head never
    merged. With one weight for every head (sync mode) this is two in-place GEMMs,
    ``W += w [B_1 .. B_K] [A_1 ; .. ; A_K]`` and the same with ``-w`` for the primed factors, and no
    elementwise work; otherwise each ``B`` is scaled by its own weight first.
    """
    if not factors:
        return
    dt = weight.dtype

    def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)).to(dt)

    if all(w == weights[0] for w in weights):
        w = float(weights[0])
        weight.addmm_(cat([f[0] for f in factors], 1), cat([f[1] for f in factors], 0), alpha=w)
        merged = [
            (b_prev, a_prev) for _, _, b_prev, a_prev in factors if b_prev is not None and a_prev is not None
        ]
        if merged:
            weight.addmm_(cat([b for b, _ in merged], 1), cat([a for _, a in merged], 0), alpha=-w)
        return
    lefts, rights = [], []
    for (b, a, b_prev, a_prev), w in zip(factors, weights, strict=True):
        lefts.append(b.to(dt) * w)
        rights.append(a)
        if b_prev is not None and a_prev is not None:
            lefts.append(b_prev.to(dt) * -w)
            rights.append(a_prev)
    weight.addmm_(cat(lefts, 1), cat(rights, 0))


@torch.no_grad()
def merge_layers_grouped(
    weights: Sequence[torch.Tensor],
    factors: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]],
    head_weights: Sequence[Sequence[float]],
    *,
    add: str = "bmm",
    max_delta_bytes: int = 256 << 20,
) -> None:
    """``merge_head_deltas`` over many layers, one set of kernels per group of same-shaped layers.

    ``weights[l] [m, n]`` gets ``sum_k head_weights[l][k] (B_k A_k - B'_k A'_k)`` with
    ``factors[l][k] = (B_k [m, r], A_k [r, n], B'_k, A'_k)`` (the primed ``None`` for a head never
    merged). Layers of one shape, dtype, device and rank pattern form a group of ``L``; its deltas
    are one batched GEMM ``[L, m, R] x [L, R, n]`` (``R``: the ranks of all terms, the primed ones
    with weight ``-w``) added by one multi-tensor add: five launches per group where the per-layer
    merge makes two or more per layer (vit-b: 50 layers in 5 shapes). The price is a temporary
    ``[L, m, n]``, bounded by computing at most ``max_delta_bytes`` of it at a time, and one more
    pass over the weights' bytes. ``add="addmm"`` prepares the factors the same way but adds each
    layer's ``[m, R] x [R, n]`` in place (one GEMM per layer, no temporary, one pass over ``W``).
    Equal to ``merge_head_deltas`` up to float summation order. Raises ValueError for another ``add``.
    """
    if add not in ("bmm", "addmm"):
        raise ValueError(f"add must be 'bmm' or 'addmm', got {add!r}")
    groups: dict[tuple, list[int]] = {}
    for index, (weight, terms) in enumerate(zip(weights, factors, strict=True)):
        if terms:
            pattern = tuple((b.shape[1], b_prev is not None) for b, _, b_prev, _ in terms)
            groups.setdefault((tuple(weight.shape), weight.dtype, weight.device, pattern), []).append(index)
    for (shape, dt, device, _), members in groups.items():
        m, n = shape
        per_chunk = max(1, max_delta_bytes // (m * n * dt.itemsize)) if add == "bmm" else len(members)
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            lefts, rights, coefs = [], [], []
            for index in chunk:
                for (b, a, b_prev, a_prev), w in zip(factors[index], head_weights[index], strict=True):
                    lefts.append(b.mT)
                    rights.append(a)
                    coefs += [w] * b.shape[1]
                    if b_prev is not None and a_prev is not None:
                        lefts.append(b_prev.mT)
                        rights.append(a_prev)
                        coefs += [-w] * b_prev.shape[1]
            layers, rank = len(chunk), len(coefs) // len(chunk)
            coef = torch.tensor(coefs, dtype=dt).view(layers, rank, 1).to(device, non_blocking=True)
            left_t = torch.cat([t.to(device, dt) for t in lefts]).view(layers, rank, m)  # [L, R, m]
            right = torch.cat([t.to(device, dt) for t in rights]).view(layers, rank, n)  # [L, R, n]
            left_t.mul_(coef)
            if add == "addmm":
                for layer, index in enumerate(chunk):
                    weights[index].addmm_(left_t[layer].mT, right[layer])
                continue
            delta = torch.bmm(left_t.mT, right)  # [L, m, n]
            torch._foreach_add_([weights[i] for i in chunk], list(delta.unbind(0)))


@dataclass
class HeadUpdate:
    """One head's factors after its local steps, keyed by the master name of each layer's weight."""

    head_id: int
    factors: dict[str, Factors]


@dataclass
class ReplicaUpdate:
    """One process's replica deltas (now minus the snapshot it trained from) and its head count."""

    heads: int
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def apply_updates(
    master: Mapping[str, torch.Tensor],
    prev_factors: dict[int, dict[str, Factors]],
    heads: Sequence[HeadUpdate],
    head_weights: Sequence[float],
    replicas: Sequence[tuple[float, ReplicaUpdate]] = (),
    *,
    scale: float,
    reset: bool = False,
    grouped: bool | None = None,
) -> None:
    """Fold head updates and replica deltas into ``master`` in place.

    ``W += scale * sum_k head_weights[k] (B_k A_k - B'_k A'_k)`` per layer, where ``B'_k, A'_k``
    come from ``prev_factors`` (zero for a head never merged) and are replaced by ``B_k, A_k``
    (``B`` zeroed for the reset variant). Each replica ``p += w * delta`` (an integer buffer, such
    as batch norm's counter, gets the rounded weighted sum). A matrix of more than two dimensions
    (a conv kernel ``[out, in, kh, kw]``) merges as its ``[out, in*kh*kw]`` view.
    ``head_weights`` are ``1/N`` in sync mode, discounted by staleness in async mode.
    ``grouped``: prepare the factors of layers of one shape together and add each layer's terms
    in one GEMM (``merge_layers_grouped(add="addmm")``: fewer launches, no temporary); None: on
    CUDA, where launches dominate a small push, not on the CPU, where the per-layer merge already
    runs at GEMM speed (``bench/merge_cost.py`` times both, and the batched-GEMM variant).
    """
    per_layer: dict[str, list] = {}
    per_layer_w: dict[str, list[float]] = {}
    for update, w in zip(heads, head_weights, strict=True):
        prev = prev_factors.get(update.head_id, {})
        for name, (b, a) in update.factors.items():
            b_prev, a_prev = prev.get(name, (None, None))  # never merged: nothing to subtract
            per_layer.setdefault(name, []).append((b, a, b_prev, a_prev))
            per_layer_w.setdefault(name, []).append(scale * w)
    names = list(per_layer)
    # conv masters merge as matrices over their unfolded patches: [out, in * kh * kw]
    flat = {n: master[n] if master[n].dim() == 2 else master[n].view(master[n].shape[0], -1) for n in names}
    if grouped is None:
        grouped = any(master[name].is_cuda for name in names)
    if grouped:
        merge_layers_grouped(
            [flat[n] for n in names],
            [per_layer[n] for n in names],
            [per_layer_w[n] for n in names],
            add="addmm",
        )
    else:
        for name in names:
            merge_head_deltas(flat[name], per_layer[name], per_layer_w[name])
    for update in heads:
        prev_factors[update.head_id] = {
            name: (torch.zeros_like(b) if reset else b.detach().clone(), a.detach().clone())
            for name, (b, a) in update.factors.items()
        }
    counters: dict[str, torch.Tensor] = {}  # integer buffers: summed in float64, rounded once
    for w, rep in replicas:
        for name, delta in rep.deltas.items():
            if master[name].is_floating_point():
                master[name].add_(delta.to(master[name].dtype), alpha=w)
            else:
                counters[name] = counters.get(name, 0) + w * delta.to(torch.float64)
    for name, total in counters.items():
        master[name].add_(total.round().to(master[name].dtype))
