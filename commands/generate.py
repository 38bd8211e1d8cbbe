"""``lte-generate``: sample text from an exported language model.

    lte-generate --model runs/kjv/model.safetensors --prompt "In the beginning" --max-new-tokens 200

The safetensors file is the plain model's state dict that ``lte-server --export`` (or
``lte-sim --export``) writes for any language-model job (the zoo GPT, a ``hf:`` model, a factory's
model returning a tensor, a ``ModelOutput``, a dict or a tuple whose first element is the logits),
with the job in its metadata: the model is rebuilt from that job (a factory's module must be
importable), sampled over the job's context through the trainer's own ``forward_logits``, and the
tokenizer (``meta.json``, and ``tokenizer.json`` for BPE) lies beside it. Nothing of the LTE layers
is needed. A transformers export folder ``hf/`` loads with ``from_pretrained`` and samples the same
way, over its config's positions; a run folder stands for its ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lte.common.core.hf import load_hf_folder
from lte.common.core.outputs import forward_logits, generate_tokens, model_context
from lte.common.data.text import Tokenizer, load_tokenizer
from lte.common.job.checks import OneLineArgumentParser
from lte.common.job.config import job_from_dict
from lte.common.job.trainer import build_job_model


def load_exported(path: str | Path) -> tuple[torch.nn.Module, Tokenizer]:
    """The plain model of an export, weights loaded (strict), in eval mode, and its tokenizer; for a
    transformers folder (``config.json`` in it or beside the file) the ``from_pretrained`` model.

    Any language-model job's export loads: the zoo GPT, a ``hf:`` model, a factory's model (its
    module importable here); the job's context is set on the model (``model_context`` reads it).
    Raises ``FileNotFoundError`` or ``ValueError`` naming the file and what is wrong (an export
    that is not a language model's, a model that cannot be rebuilt, weights that do not fit it).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file():  # a Hugging Face folder (lte's hf/ export)
        return load_hf_folder(folder), load_tokenizer(folder)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a run folder, as lte-eval takes
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except SafetensorError as exc:
        raise ValueError(
            f"{path}: not a safetensors file ({exc}); give the model.safetensors of a run"
        ) from None
    if "lte_job" not in meta:
        raise ValueError(
            f"{path}: no 'lte_job' metadata; export the model with lte-server or lte-sim --export"
        )
    job = job_from_dict(json.loads(meta["lte_job"]), source=str(path))
    if job.task != "lm":
        raise ValueError(
            f"{path}: a {job.task or 'non-language'} model ({job.model}); lte-generate needs a language "
            "model (the export of a --dataset text job)"
        )
    try:
        if ":" in job.model:  # a hf: model or a factory's: built as the job built it
            model = build_job_model(job)
        else:  # the zoo GPT: no memory for the random init the weights replace
            with torch.device("meta"):
                model = build_job_model(job)
            model = model.to_empty(device="cpu")
    except (ImportError, AttributeError, TypeError) as exc:  # a factory missing here, or changed
        first = " ".join(str(exc).split())
        raise ValueError(f"{path}: cannot rebuild the job's model {job.model}: {first}") from None
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path}: the weights do not fit the job's model {job.model}: {first}") from None
    model.eval()
    return model, load_tokenizer(path.parent)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="lte-generate", description="Sample text from an exported LTE language model."
    )
    p.add_argument(
        "--model",
        required=True,
        help="model.safetensors of a language model's lte-server/lte-sim job (tokenizer beside it), or its hf/ folder",
    )
    p.add_argument(
        "--prompt", default="", help="text to continue ['': starts from the first token of a newline]"
    )
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token [0.8]")
    p.add_argument(
        "--top-k", type=int, default=40, help="sample among the k most likely tokens, 0 for all [40]"
    )
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_new_tokens < 0 or args.num_samples < 1 or args.top_k < 0 or args.temperature < 0:
            raise ValueError("--max-new-tokens, --top-k and --temperature must be >= 0, --num-samples >= 1")
        model, tokenizer = load_exported(args.model)
        ids = tokenizer.encode(args.prompt or "\n")
        if not ids:
            raise ValueError("--prompt encodes to no tokens")
        vocab_size = vocabulary(model)
        if max(ids) >= vocab_size:
            raise ValueError(
                f"the tokenizer beside {args.model} does not match the model's vocabulary of {vocab_size}"
            )
        context = model_context(model)  # a transformers folder: its config's positions
    except (ValueError, OSError, TypeError) as exc:  # TypeError: a forward without logits
        print(f"lte-generate: error: {exc}", file=sys.stderr)
        return 2
    prompt = torch.tensor([ids] * args.num_samples)
    # every export samples the same way: the trainer's forward_logits over the last `context`
    # tokens, so a prompt at the positions' end or --max-new-tokens 0 is no special case
    gen = torch.Generator().manual_seed(args.seed)
    out = generate_tokens(
        model,
        prompt,
        args.max_new_tokens,
        context=context,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=gen,
    )
    for i, row in enumerate(out.tolist()):
        if i:
            print("\n---")
        print(tokenizer.decode(row if args.prompt else row[len(ids) :]))
    return 0


def vocabulary(model: torch.nn.Module) -> int:
    """The model's vocabulary: the last dimension of its logits for one token (id 0)."""
    with torch.no_grad():
        return int(forward_logits(model, torch.zeros((1, 1), dtype=torch.long)).shape[-1])


if __name__ == "__main__":
    sys.exit(main())
