"""Calling a user's model and reading its logits, whatever it returns.

lte's zoo models return a tensor; Hugging Face ``transformers`` models return a ``ModelOutput``
(a dict subclass with ``logits``), others a dict or a tuple whose first element is the logits.
``forward_logits`` is the one call the trainer, the evaluation, the start-up check and
``lte-generate`` make: a transformers model gets ``use_cache=False`` (training and evaluation run
whole windows; a key/value cache would only cost memory) under the keyword its forward takes.
``generate_tokens`` samples text from any causal language model through that call, over the
windows ``model_context`` finds on the model.
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


def model_context(model: nn.Module) -> int:
    """The windows (tokens) a language model is evaluated and sampled on: the zoo GPT's
    ``config.context``, the job's context set on any other model at build (``lte_context``), else a
    transformers config's positions. Raises ``ValueError`` when none of these is there."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "context"):
        return int(config.context)
    lte_context = getattr(model, "lte_context", None)
    if isinstance(lte_context, int):
        return lte_context
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    raise ValueError(
        "a language model must carry config.context (as the zoo GPT does) or a transformers config"
    )


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    ids: torch.Tensor,
    max_new_tokens: int,
    *,
    context: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``ids [B, L]`` (returns ``[B, L + max_new_tokens]``).

    Each step reads the logits ``[B, L', V]`` of the last ``context`` tokens through
    ``forward_logits`` and draws the next token from ``softmax(logits[:, -1] / temperature)``
    restricted to the ``top_k`` most likely (0: the whole vocabulary); ``temperature`` 0 takes the
    most likely token (greedy). No key/value cache: every step runs the whole window, as the
    training did. The model should be in eval mode. Raises ``ValueError`` for ``context < 1``.
    """
    if context < 1:
        raise ValueError(f"context must be >= 1 tokens, got {context}")
    for _ in range(max_new_tokens):
        logits = forward_logits(model, ids[:, -context:])[:, -1, :]
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
