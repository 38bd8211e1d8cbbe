"""Hugging Face ``transformers`` models: ``--model hf:PATH`` and the export as a transformers folder.

``hf:PATH`` names a local ``config.json`` (or a folder holding one); the model is built with
``AutoConfig`` and ``AutoModelForCausalLM.from_config`` (random init, never a download). Its
``vocab_size`` must be the token files' vocabulary. ``transformers`` is the optional extra
``lte[hf]``, imported only here and only when such a model is used.

The export of such a model as a transformers folder (``<run>/hf/``) is ``lte.common.job.export``'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PREFIX = "hf:"
INSTALL = "pip install 'lte[hf]' (or: pip install transformers)"
HF_FOLDER = "hf"


class HFError(ValueError):
    """A ``hf:`` model that cannot be built; the message is one line naming the file and the fix."""


def is_hf(name: str) -> bool:
    return name.startswith(PREFIX)


def require_transformers() -> Any:
    """The ``transformers`` module. Raises ``HFError`` saying how to install it when it is missing."""
    try:
        import transformers
    except ImportError:
        raise HFError(
            f"Hugging Face models need the transformers package, which is not installed: {INSTALL}"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # lte's commands print their own one-line progress
    return transformers


def config_path(name: str) -> Path:
    """The ``config.json`` that ``hf:PATH`` names (PATH the file or a folder holding it).

    Raises ``HFError`` for a path that does not exist (a hub name is refused: lte never downloads),
    or a folder without ``config.json``.
    """
    raw = name[len(PREFIX) :] if is_hf(name) else name
    path = Path(raw).expanduser()
    if not raw:
        raise HFError("--model hf:PATH needs the path of a local config.json or of a folder holding one")
    if not path.exists():
        raise HFError(
            f"--model {name}: no such local file or folder; lte never downloads a model: save its config "
            "on a machine with access (AutoConfig.from_pretrained(NAME).save_pretrained(DIR)) and pass hf:DIR"
        )
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise HFError(
                f"--model {name}: the folder has no config.json (save one with config.save_pretrained)"
            )
    return path


def read_config(name: str) -> dict[str, Any]:
    """``config.json`` of ``hf:PATH`` as a dict (no transformers needed). Raises ``HFError``."""
    path = config_path(name)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise HFError(
            f"{path}: not a transformers config (no 'model_type'); write it with config.save_pretrained"
        )
    if not isinstance(values.get("vocab_size"), int) or values["vocab_size"] < 1:
        raise HFError(
            f"{path}: the config has no vocab_size; set vocab_size to the token files' vocabulary "
            "(meta.json's vocab_size)"
        )
    return values


def context_of(values: Mapping[str, Any]) -> int:
    """The longest sequence a config allows (``max_position_embeddings`` or GPT-2's ``n_positions``); 0 if none."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(values.get(key), int) and values[key] > 0:
            return int(values[key])
    return 0


def check_hf_model(name: str) -> None:
    """What start-up checks before any data is read: transformers installed, a local config with a
    ``vocab_size`` that transformers knows. Raises ``HFError``."""
    read_config(name)
    transformers = require_transformers()
    try:
        transformers.AutoConfig.from_pretrained(str(config_path(name).parent), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise HFError(f"--model {name}: transformers cannot read its config: {first}") from None


def build_hf_model(name: str, *, vocab_size: int | None = None, context: int | None = None) -> nn.Module:
    """A transformers causal LM from the local config ``hf:PATH``, randomly initialised (the global
    torch seed decides the weights, as for a zoo model).

    ``vocab_size``: the token files' vocabulary (the job's ``num_classes``), which the config's must
    equal; ``context``: the job's sequence length, which the config's positions must hold. Raises
    ``HFError`` naming the config and what to change.
    """
    values = read_config(name)
    path = config_path(name)
    if vocab_size and values["vocab_size"] != vocab_size:
        raise HFError(
            f"{path}: vocab_size {values['vocab_size']} differs from the token files' vocabulary {vocab_size}; "
            f"set vocab_size to {vocab_size} in the config (or prepare the text with its tokenizer)"
        )
    longest = context_of(values)
    if context and longest and context > longest:
        raise HFError(
            f"{path}: --context {context} is longer than the config's {longest} positions; pass --context {longest} or less"
        )
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(str(path.parent), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if context:
        model.lte_context = int(context)  # the job's windows: evaluation reads the same length
    return model


def is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    return any(
        c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
        for c in type(model).__mro__
    )


def load_hf_folder(folder: str | Path, context: int | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of an exported folder (local files only), in eval mode."""
    transformers = require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    if context:
        model.lte_context = int(context)
    return model.eval()


@torch.no_grad()
def sample_tokens(
    model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float, top_k: int, seed: int
) -> torch.Tensor:
    """transformers' ``generate`` as the zoo GPT's: ``prompt [B, L]`` plus ``max_new_tokens`` tokens
    (fewer where the config's positions end), sampled at ``temperature`` among the ``top_k`` most
    likely (0: greedy), from a generator seeded with ``seed`` (the global one is left as it was)."""
    config: Any = model.config
    positions = context_of(config.to_dict())
    if positions:
        max_new_tokens = max(0, min(max_new_tokens, positions - prompt.shape[1]))
    sample = temperature > 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return model.generate(  # type: ignore[operator]
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=sample,
            **({"temperature": temperature, "top_k": top_k} if sample else {}),
            pad_token_id=0,
        )
