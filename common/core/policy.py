"""How every parameter and buffer of a user's model is trained: the state policy, in one place.

``classify_model`` sorts each entry of a model's ``state_dict`` into one kind:

- ``lte heads``: a matrix weight of a module in ``LTE_MODULES`` (``nn.Linear`` and its
  subclasses, ``nn.MultiheadAttention``'s packed input and output projections, ``nn.Conv2d`` as a
  matrix over its unfolded patches). The server holds it; workers train LoRA heads on ``q(W)``.
- ``replica``: any other trainable parameter. Each worker trains a copy; deltas are averaged.
- ``averaged buffer``: running statistics of norm layers (``running_mean``, ``running_var``,
  ``num_batches_tracked``): each worker updates its copy; deltas are averaged like replicas, so
  the master's statistics are the workers' average (weighted by heads).
- ``worker-local buffer``: every other buffer: loaded from the server's snapshot, never pushed.
- ``frozen``: a parameter with ``requires_grad=False``: loaded from the snapshot, never pushed.
- ``tied``: a second name of a parameter or buffer (weight tying): it carries nothing itself;
  its owner (the first name, as ``named_parameters`` orders them) is trained, and the tie holds
  on every worker and in the exported ``state_dict`` (both names, equal values).

The worker (``prepare_model``), ``lte-sim`` and the server (push expectations, start-up check,
``--explain-model``) all use this one function. Adding a kind of matrix is one row of
``LTE_MODULES`` (say ``(nn.Embedding, LTEEmbedding)``), given an LTE module with the same
interface (``matrices``, ``unsupported``, ``from_module``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lte.common.core.layers import (
    LTEConfig,
    LTEConv1D,
    LTEConv2d,
    LTEEmbedding,
    LTELinear,
    LTEMultiheadAttention,
    LTETiedLinear,
    conv1d_class,
)
from lte.common.core.model_state import lte_layers, replica_parameters
from lte.common.core.quant import QuantizedTensor

HEADS, REPLICA, AVERAGED, LOCAL, FROZEN, TIED = (
    "lte heads",
    "replica",
    "averaged buffer",
    "worker-local buffer",
    "frozen",
    "tied",
)
KINDS = (HEADS, REPLICA, AVERAGED, LOCAL, FROZEN, TIED)


class LTEModuleClass(Protocol):
    """What the conversion table needs of an LTE class (its static and class methods)."""

    def matrices(self, module: nn.Module) -> tuple[str, ...]: ...

    def unsupported(self, module: nn.Module) -> str | None: ...

    def from_module(self, module: nn.Module, config: LTEConfig, layer_index: int) -> nn.Module: ...


# Plain module type -> its LTE replacement. isinstance match (subclasses count unless they override
# forward); the first row that matches wins; a matched module's submodules are never matched apart.
LTE_MODULES: tuple[tuple[type[nn.Module], LTEModuleClass], ...] = (
    (nn.MultiheadAttention, LTEMultiheadAttention),
    (nn.Conv2d, LTEConv2d),
    (nn.Linear, LTELinear),
    (nn.Embedding, LTEEmbedding),  # off with embeddings=False (--no-embedding-heads): then a replica
)

# Module type -> buffers averaged across workers like replicas; every other buffer is worker-local.
AVERAGED_BUFFERS: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (_NormBase, ("running_mean", "running_var", "num_batches_tracked")),
)


class ModelRefused(ValueError):
    """The model cannot train with LTE as configured; the message names the tensor and the fix."""


@dataclass(frozen=True)
class StateEntry:
    """One ``state_dict`` entry: its kind, shape, dtype, owning module type, and why (``note``)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    module: str
    note: str = ""
    owner: str | None = None  # tied: the name that carries the value

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelPolicy:
    """The classified state of a model (names are the plain model's ``state_dict`` names)."""

    entries: dict[str, StateEntry]
    converted: dict[str, tuple[LTEModuleClass, int]]  # module path -> (LTE class, first layer index)
    nonpersistent_buffers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # output layers tied to an input embedding: Linear path -> embedding path (LTETiedLinear)
    tied_outputs: dict[str, str] = field(default_factory=dict)

    def names(self, *kinds: str) -> list[str]:
        return [n for n, e in self.entries.items() if e.kind in kinds]

    @property
    def head_names(self) -> list[str]:
        """Matrix weights with LTE heads (master names)."""
        return self.names(HEADS)

    @property
    def uplink_names(self) -> list[str]:
        """What a push carries besides factors: replicas and averaged buffers, in state_dict order."""
        return self.names(REPLICA, AVERAGED)

    @property
    def ties(self) -> dict[str, str]:
        """Tied name -> owner name."""
        return {n: e.owner for n, e in self.entries.items() if e.kind == TIED and e.owner}


def _rows() -> tuple[tuple[type[nn.Module], LTEModuleClass], ...]:
    """``LTE_MODULES``, plus transformers' ``Conv1D`` row when transformers is imported."""
    conv1d = conv1d_class()
    return LTE_MODULES if conv1d is None else ((conv1d, LTEConv1D), *LTE_MODULES)


def _match(module: nn.Module, embeddings: bool = True) -> LTEModuleClass | None:
    for plain, lte in _rows():
        if isinstance(module, plain) and (embeddings or lte is not LTEEmbedding):
            return lte
    return None


def _linear_like(module: nn.Module) -> bool:
    """A module lte does not convert that holds a matrix ``weight`` (a Linear of another library)."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2 and weight.requires_grad


def tied_outputs(model: nn.Module, embeddings: bool = True) -> dict[str, str]:
    """Output layers tied to an input table: path of each ``nn.Linear`` whose ``weight`` is an
    ``nn.Embedding``'s ``weight`` (the same parameter) -> the embedding's path.

    Found from the parameters' identity, whatever the modules are called (transformers' ``lm_head``
    and ``embed_tokens`` / ``wte``, or any model's). Only a trainable table that ``LTEEmbedding``
    converts, tied to plain Linears (forward not overridden), qualifies; with ``embeddings`` False none.
    """
    if not embeddings:
        return {}
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for owner, aliases in tied_groups(model).items():
        names = [owner, *aliases]
        paths = [n.rpartition(".")[0] for n in names]
        if any(not n.endswith("weight") or n.rpartition(".")[2] != "weight" for n in names):
            continue
        tables = [
            p
            for p in paths
            if isinstance(modules[p], nn.Embedding) and LTEEmbedding.unsupported(modules[p]) is None
        ]
        others = [p for p in paths if p not in tables]
        if len(tables) != 1 or not others or not modules[tables[0]].weight.requires_grad:
            continue
        if all(
            isinstance(modules[p], nn.Linear) and type(modules[p]).forward is nn.Linear.forward
            for p in others
        ):
            out.update(dict.fromkeys(others, tables[0]))
    return out


def tied_groups(model: nn.Module) -> dict[str, list[str]]:
    """Owner name -> its other names, for every parameter or buffer registered under several names."""
    names: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(t), []).append(name)
    for name, b in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), []).append(name)
    return {group[0]: group[1:] for group in names.values() if len(group) > 1}


def retie(model: nn.Module, ties: dict[str, list[str]]) -> None:
    """Make every alias in ``ties`` (owner -> aliases) the owner's tensor again, in place."""
    for owner, aliases in ties.items():
        owner_module, _, owner_attr = owner.rpartition(".")
        value = getattr(model.get_submodule(owner_module), owner_attr, None)
        if not isinstance(value, torch.Tensor):  # the owner is now an LTETiedLinear: no tensor to tie
            continue
        for alias in aliases:
            path, _, attr = alias.rpartition(".")
            module = model.get_submodule(path)
            if isinstance(module, LTETiedLinear):  # reads its table through the LTE heads already
                continue
            if isinstance(value, nn.Parameter):
                setattr(module, attr, value)
            else:
                module._buffers[attr] = value


def averaged_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers averaged across workers (``AVERAGED_BUFFERS``), by their state_dict names."""
    out: dict[str, torch.Tensor] = {}
    for path, module in model.named_modules():
        for kind, names in AVERAGED_BUFFERS:
            if isinstance(module, kind):
                for b in names:
                    value = module._buffers.get(b)
                    if value is not None and b not in module._non_persistent_buffers_set:
                        out[f"{path}.{b}" if path else b] = value
    return out


def classify_model(
    model: nn.Module,
    *,
    exclude: Sequence[str] = (),
    replicas: bool = True,
    strict: bool = True,
    heads: int = 1,
    embeddings: bool = True,
) -> ModelPolicy:
    """Classify every ``state_dict`` entry of the plain ``model`` (works on the meta device).

    ``heads``: the most heads one process holds (only for the batch-norm warning). ``embeddings``:
    ``nn.Embedding`` tables get LTE heads (``--embedding-heads``), else they are replicas. Raises
    ``ModelRefused`` in strict mode when a trainable parameter would be covered by neither heads
    nor replicas (an excluded matrix left trainable, any trainable parameter with ``replicas=False``).
    """
    ties = tied_groups(model)
    alias_of = {alias: owner for owner, aliases in ties.items() for alias in aliases}
    outputs = tied_outputs(model, embeddings)
    for out_path, table in outputs.items():  # the table carries the tie, whatever the order of names
        alias_of.pop(f"{table}.weight", None)
        alias_of[f"{out_path}.weight"] = f"{table}.weight"
    table_ids = {id(model.get_submodule(t).weight) for t in outputs.values()}
    tied_ids = {id(t) for n, t in model.named_parameters() if n in ties} - table_ids
    heads_names: dict[str, str] = {}
    notes: dict[str, str] = {}
    converted: dict[str, tuple[LTEModuleClass, int]] = {}
    inside: list[str] = []  # paths of matched modules: their submodules are theirs
    index = 0
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        lte_cls = _match(module, embeddings)
        if lte_cls is None:
            if _linear_like(module) and path not in outputs:
                notes[f"{path}.weight" if path else "weight"] = (
                    f"not converted: lte does not convert a {type(module).__name__} (it converts nn.Linear, "
                    "Conv1D, nn.Conv2d, nn.Embedding, nn.MultiheadAttention); a full-size replica"
                )
            continue
        if path in outputs:  # the tied output layer: its table's heads (LTETiedLinear)
            inside.append(path)
            index += 1  # as the Linear it was: the layers after it keep their seeds
            continue
        inside.append(path)
        matrices = lte_cls.matrices(module)
        first, index = index, index + len(matrices)  # excluded ones keep their index: seeds stay put
        names = [f"{path}.{m}" if path else m for m in matrices]
        params = [module.get_parameter(m) for m in matrices]
        why = None
        if path in exclude:
            why = "excluded (--exclude)"
        elif reason := lte_cls.unsupported(module):
            why = f"not converted: {reason}"
        elif any(id(p) in tied_ids or n in alias_of for n, p in zip(names, params, strict=True)):
            why = "not converted: its weight is tied (the tie's owner trains as a replica)"
        elif not all(p.requires_grad for p in params):
            why = "frozen matrix"
        if why is None:
            converted[path] = (lte_cls, first)
            heads_names.update(dict.fromkeys(names, type(module).__name__))
        else:
            notes.update(dict.fromkeys(names, why))
    modules = dict(model.named_modules())
    averaged = set(averaged_buffers(model))
    all_params = dict(model.named_parameters(remove_duplicate=False))
    entries: dict[str, StateEntry] = {}
    uncovered: list[str] = []
    for name, t in model.state_dict(keep_vars=True).items():
        path = name.rpartition(".")[0]
        module_type = type(modules[path]).__name__
        shape, dtype = tuple(t.shape), t.dtype
        note = notes.get(name, "")
        if name in alias_of:
            how = " (the output layer: the table's LTE heads)" if path in outputs else ""
            entries[name] = StateEntry(
                name, TIED, shape, dtype, module_type, f"tied to {alias_of[name]}{how}", alias_of[name]
            )
            continue
        if name in heads_names:
            kind = HEADS
        elif name in all_params:
            if not all_params[name].requires_grad:
                kind = FROZEN
            elif not replicas:
                kind = REPLICA
                uncovered.append(name)
            else:
                kind = REPLICA
                if name in notes and notes[name].startswith("excluded"):
                    uncovered.append(f"{name} (excluded matrix left trainable)")
        elif name in averaged:
            kind = AVERAGED
        else:
            kind = LOCAL
        entries[name] = StateEntry(name, kind, shape, dtype, module_type, note)
    if uncovered and strict:
        raise ModelRefused(
            f"model: trainable parameter {uncovered[0]} is covered by neither LTE heads nor replicas"
            + (f" (and {len(uncovered) - 1} more)" if len(uncovered) > 1 else "")
            + "; freeze it (requires_grad=False) or let it train as a replica"
        )
    persistent = set(entries)
    nonpersistent = [n for n, _ in model.named_buffers() if n not in persistent]
    policy = ModelPolicy(entries, converted, nonpersistent, tied_outputs=outputs)
    if heads > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules.values()):
        policy.warnings.append(
            f"batch norm computes its statistics over the stacked batch of a worker's {heads} heads: "
            "the heads' samples mix in each normalisation (use LayerNorm/GroupNorm, or one head per worker)"
        )
    dropouts = [m for m in modules.values() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropouts:
        policy.warnings.append(
            f"{len(dropouts)} dropout module(s) (p up to {max(m.p for m in dropouts):g}) draw their masks from "
            "each process's generator: a sync run over the network will not equal lte-sim bit for bit "
            "(set the dropout probabilities to 0 for that)"
        )
    return policy


def convert_model(model: nn.Module, config: LTEConfig) -> nn.Module:
    """Replace, in place, every module the policy converts with its LTE module; returns ``model``."""
    policy = classify_model(
        model,
        exclude=config.exclude,
        replicas=config.replicas,
        strict=config.strict,
        embeddings=config.embeddings,
    )
    for path, (lte_cls, index) in policy.converted.items():
        module = model.get_submodule(path)
        layer = lte_cls.from_module(module, config, index)
        if path:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
        else:
            raise ModelRefused(f"model: the model itself is a {type(module).__name__}; wrap it in a module")
    for path, table in policy.tied_outputs.items():
        linear, embedding = model.get_submodule(path), model.get_submodule(table)
        bias = linear.bias if isinstance(linear.bias, torch.Tensor) else None
        if not isinstance(embedding, LTEEmbedding):  # its table stayed a replica: the tie stays as it is
            continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, LTETiedLinear(embedding, bias))
    for name, layer in lte_layers(model).items():
        layer.name = name
    return model


def expect_stacked_batch(model: nn.Module, rows: int | None) -> None:
    """Every LTE layer checks in training that dim 0 of its input is ``rows`` (heads x batch)."""
    for layer in lte_layers(model).values():
        layer.expected_rows = rows


# -- model conversion and the worker's state by policy (here, not in layers.py: it needs the table above) --
def prepare_model(model: nn.Module, config: LTEConfig) -> nn.Module:
    """Convert ``model`` in place by the state policy (``classify_model`` above): every matrix weight of
    ``LTE_MODULES`` (Linear and its subclasses, MultiheadAttention's projections, Conv2d) becomes an
    LTE layer; other trainable parameters are replicas; ties keep one owner.

    Raises ``ModelRefused`` (a ValueError) in strict mode for a trainable parameter that neither
    heads nor replicas cover (an excluded Linear left trainable, or any when ``replicas=False``).
    """
    return convert_model(model, config)


def prepare_model_on_device(
    meta_model: nn.Module, config: LTEConfig, device: torch.device | str
) -> nn.Module:
    """``prepare_model`` for a model built on the meta device, allocated on ``device`` without its base.

    The heads' factors are initialised exactly as ``prepare_model`` does; the base weights (their
    quantised codes), biases and replicas are allocated but left uninitialised, for
    ``load_master_weights`` to fill. A worker, whose base always comes from the server, so never
    holds a full-precision copy of the model (for vit-b, 340 MB of fp32 it would only discard).
    Tied parameters are tied again after allocation (``to_empty`` gives each module its own).
    """
    ties = tied_groups(meta_model)
    model = prepare_model(meta_model, config).to_empty(device=device)
    retie(model, ties)
    for layer in lte_layers(model).values():
        layer.reset_parameters(
            config.head_ids, config.seed, layer.layer_index, config.a_init, config.a_init_gain
        )
    return model


def uplink_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a worker pushes besides factors: replicas and averaged buffers (running statistics)."""
    return {**replica_parameters(model), **averaged_buffers(model)}


def export_replica_deltas(model: nn.Module, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replica (and averaged buffer) value now minus its value in the snapshot the process trained from."""
    return {name: (p.detach() - base[name].to(p.dtype)) for name, p in uplink_tensors(model).items()}


@torch.no_grad()
def load_master_weights(model: nn.Module, weights: Mapping[str, torch.Tensor | QuantizedTensor]) -> None:
    """Load base weights (full or quantised) and replica values from a master state dict.

    Names are those of the plain zoo model. Missing or unexpected names are errors, so a
    snapshot can never silently leave part of the model behind.
    """
    layers = lte_layers(model)
    replicas = uplink_tensors(model)
    expected = set(layers) | set(replicas)
    # an output layer tied to its table (LTETiedLinear) reads the table's weight: its alias may travel
    tied = {f"{p}.weight" for p, m in model.named_modules() if isinstance(m, LTETiedLinear)}
    weights = {k: v for k, v in weights.items() if k not in tied}
    missing, unexpected = expected - set(weights), set(weights) - expected
    unexpected -= set(model.state_dict())  # frozen params, buffers and tied names may travel too
    if missing or unexpected:
        raise KeyError(
            f"master weights do not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for name, value in weights.items():
        if name in layers:
            layers[name].set_base_weight(
                value if isinstance(value, QuantizedTensor) else value.to(layers[name].lora_A.dtype)
            )
        elif isinstance(value, QuantizedTensor):
            raise TypeError(f"{name}: only the weights of LTE layers travel quantised")
        elif name in replicas:
            replicas[name].copy_(value)
        else:
            _set_tensor(model, name, value)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    getattr(owner, attr).copy_(value)
