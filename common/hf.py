"""Hugging Face ``transformers`` models: ``--model hf:PATH`` and the export as a transformers folder.

``hf:PATH`` names a local ``config.json`` (or a folder holding one); the model is built with
``AutoConfig`` and ``AutoModelForCausalLM.from_config`` (random init, never a download). Its
``vocab_size`` must be the token files' vocabulary. ``transformers`` is the optional extra
``lte[hf]``, imported only here and only when such a model is used.

``export_hf_folder`` writes ``<run>/hf/``: ``config.json``, ``model.safetensors`` (transformers'
names; tied weights as transformers saves them) and the tokenizer files, so
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load it.
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


def export_hf_folder(
    model_file: str | Path,
    job: Any,
    state: Mapping[str, torch.Tensor],
    dataset: Any,
    metadata: Mapping[str, str],
) -> Path | None:
    """Beside the lte export ``model_file`` of a ``hf:`` job, the folder ``hf/``: ``config.json`` and
    ``model.safetensors`` written by transformers' ``save_pretrained`` (its names; a tied output
    layer saved once, as transformers does), the lte metadata added to that file (``lte-eval`` and
    ``lte-generate`` read the job there), and the token data's tokenizer as transformers files.
    ``state``: the plain model's weights (the master). Returns the folder; None for another model.
    """
    if not is_hf(job.model):
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lte.common.text import copy_tokenizer
    from lte.common.trainer import build_job_model

    model = build_job_model(job)
    model.load_state_dict({k: v.detach().to("cpu") for k, v in state.items()}, strict=True)
    folder = Path(model_file).parent / HF_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))  # type: ignore[operator]
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        saved = dict(fh.metadata() or {})
    save_file(load_file(str(weights)), str(weights), metadata={**saved, **metadata})
    if getattr(dataset, "task", "") == "lm":
        copy_tokenizer(dataset, folder)  # meta.json (and a BPE's tokenizer.json): lte's tokenizer
        save_hf_tokenizer(dataset.folder, folder)
    return folder


def load_hf_folder(folder: str | Path, context: int | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of an exported folder (local files only), in eval mode."""
    transformers = require_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    if context:
        model.lte_context = int(context)
    return model.eval()


def save_hf_tokenizer(data_folder: str | Path, out: str | Path) -> None:
    """The token data's tokenizer as transformers files in ``out``: a BPE's ``tokenizer.json``, or
    for byte tokens (id ``t`` is byte ``t``) a ``tokenizers`` model with exactly that mapping.

    ``AutoTokenizer.from_pretrained(out)`` then encodes text to the ids ``lte-prepare-text`` wrote.
    """
    import shutil
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lte.common.text import BYTES_ID, META_FILE, TOKENIZER_FILE

    transformers = require_transformers()
    meta = json.loads((Path(data_folder) / META_FILE).read_text(encoding="utf-8"))
    byte_level = meta.get("tokenizer") == BYTES_ID
    if byte_level:
        # byte t <-> id t: each byte as its ByteLevel character (GPT-2's printable stand-ins), no merges
        byte_char = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={byte_char[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok = Tokenizer.from_file(str(Path(data_folder) / TOKENIZER_FILE))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    with tempfile.TemporaryDirectory() as tmp:
        fast.save_pretrained(tmp)
        for file in Path(tmp).iterdir():
            # a BPE keeps lte's own tokenizer.json (the same model; lte checks its id by its text)
            if byte_level or file.name != TOKENIZER_FILE:
                shutil.copyfile(file, Path(out) / file.name)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet; Radford et al. 2019's encoder.py)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


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
