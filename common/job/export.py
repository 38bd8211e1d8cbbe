"""One export for ``lte-server`` and ``lte-sim``: the same file, the same metadata.

``export_model`` writes the merged model as a plain safetensors ``state_dict`` (the zoo model's names)
with the resolved job, the preprocessing and the versions in its metadata (``run_metadata``), mode
0666 less the umask; for token data the tokenizer beside it; for a transformers model (``hf:PATH``,
or a factory returning a ``PreTrainedModel``) also ``hf/``, a transformers folder: ``config.json``, ``model.safetensors`` (transformers' names; tied weights as
transformers saves them) and the tokenizer files, so ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lte.common.core.hf import HF_FOLDER, is_transformers_model, require_transformers
from lte.common.data.text import BYTES_ID, META_FILE, TOKENIZER_FILE, copy_tokenizer
from lte.common.job.config import JobConfig
from lte.common.job.run_metadata import export_metadata, share_as_umask
from lte.common.job.trainer import build_job_model


def export_model(
    path: str | Path, state: Mapping[str, torch.Tensor], job: JobConfig, dataset: Any, *, version: int
) -> Path:
    """Write ``state`` (the plain model's weights, the master) to ``path`` as described above.

    ``version``: the model version (merges folded in) recorded in the metadata. The tensors are
    cloned to CPU first (a tied table and output layer share storage, which safetensors refuses).
    Returns ``path``. Raises OSError when the folder cannot be written.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    metadata = export_metadata(job, dataset, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    share_as_umask(path)  # 0644 under the usual umask, not safetensors' 0600
    copy_tokenizer(dataset, path.parent)  # language models: the tokenizer goes beside the weights
    export_hf_folder(path, job, tensors, dataset, metadata)
    return path


def export_hf_folder(
    model_file: str | Path,
    job: Any,
    state: Mapping[str, torch.Tensor],
    dataset: Any,
    metadata: Mapping[str, str],
) -> Path | None:
    """Beside the lte export ``model_file`` of a job whose model is a transformers ``PreTrainedModel``
    (``hf:PATH``, or a factory returning one), the folder ``hf/``: ``config.json`` (the model's
    ``config``) and ``model.safetensors`` written by transformers' ``save_pretrained`` (its names; a
    tied output layer saved once, as transformers does), the lte metadata added to that file
    (``lte-eval`` and ``lte-generate`` read the job there), and the token data's tokenizer as
    transformers files. ``state``: the plain model's weights (the master). Returns the folder; None
    for another model (a zoo model is not even built).
    """
    if ":" not in job.model:  # a zoo model: never a transformers one
        return None
    with torch.random.fork_rng(devices=[]):  # the build seeds torch: the caller's generator is left as it was
        model = build_job_model(job)
    if not is_transformers_model(model):
        return None
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


def save_hf_tokenizer(data_folder: str | Path, out: str | Path) -> None:
    """The token data's tokenizer as transformers files in ``out``: a BPE's ``tokenizer.json``, or
    for byte tokens (id ``t`` is byte ``t``) a ``tokenizers`` model with exactly that mapping.

    ``AutoTokenizer.from_pretrained(out)`` then encodes text to the ids ``lte-prepare-text`` wrote.
    """
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
