"""Calling a user's model and reading its logits, whatever it returns.

lte's zoo models return a tensor; Hugging Face ``transformers`` models return a ``ModelOutput``
(a dict subclass with ``logits``), others a dict or a tuple whose first element is the logits.
``forward_logits`` is the one call the trainer, the evaluation, the start-up check and
``lte-generate`` make: a transformers model gets ``use_cache=False`` (training and evaluation run
whole windows; a key/value cache would only cost memory) under the keyword its forward takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

# the keywords a transformers forward names its input by (the first one it declares is used)
INPUT_KEYWORDS = ("input_ids", "pixel_values", "inputs_embeds", "input_values")

_call_cache: dict[type, tuple[str | None, bool]] = {}


def _signature(cls: type) -> tuple[str | None, bool]:
    """(input keyword, takes use_cache) of ``cls.forward``; (None, False) for a plain module."""
    if cls not in _call_cache:
        try:
            params = inspect.signature(cls.forward).parameters  # type: ignore[attr-defined]
        except (TypeError, ValueError):  # a builtin or C forward: call it positionally
            params = {}  # type: ignore[assignment]
        keyword = next((k for k in INPUT_KEYWORDS if k in params), None)
        _call_cache[cls] = (keyword, "use_cache" in params)
    return _call_cache[cls]


def logits_of(output: object) -> torch.Tensor:
    """The logits in a model's output: a tensor itself, ``output["logits"]`` of a ``ModelOutput`` or
    dict (else its first value), or the first element of a tuple or list.

    Raises ``TypeError`` naming what the model returned when no tensor is found there.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get("logits") if "logits" in output else next(iter(output.values()), None)
    elif isinstance(output, tuple | list):
        value = output[0] if output else None
    else:
        value = None
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"the model returned a {type(output).__name__} without logits: return a tensor, a dict or "
            "ModelOutput with 'logits', or a tuple whose first element is the logits"
        )
    return value


def forward_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for the batch ``x`` (``[B, ...]``).

    A forward declaring ``input_ids`` (or ``pixel_values``...) gets ``x`` under that keyword, and
    ``use_cache=False`` when it takes one; any other module is called as ``model(x)``.
    """
    keyword, cache = _signature(type(model))
    kwargs: dict[str, object] = {"use_cache": False} if cache else {}
    out = model(**{keyword: x}, **kwargs) if keyword else model(x, **kwargs)
    return logits_of(out)
