"""``lte-generate``: sample text from an exported language model.

    lte-generate --model runs/kjv/model.safetensors --prompt "In the beginning" --max-new-tokens 200

The safetensors file is the plain zoo GPT's state dict that ``lte-server --export`` (or
``lte-sim --export``) writes, with the job in its metadata; the tokenizer (``meta.json``, and
``tokenizer.json`` for BPE) lies beside it. Nothing of the LTE layers is needed. A ``hf:`` job's
export folder ``hf/`` (or its ``model.safetensors``) loads with transformers' ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lte.common.core.hf import load_hf_folder, sample_tokens
from lte.common.data.text import Tokenizer, load_tokenizer
from lte.common.job.checks import OneLineArgumentParser
from lte.common.job.config import job_from_dict
from lte.common.job.models import GPT
from lte.common.job.trainer import build_job_model


def load_exported(path: str | Path) -> tuple[torch.nn.Module, Tokenizer]:
    """The zoo model of an export, weights loaded (strict), in eval mode, and its tokenizer; for a
    transformers folder (``config.json`` in it or beside the file) the ``from_pretrained`` model.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file and what is wrong.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file():  # a Hugging Face folder (lte's hf/ export)
        return load_hf_folder(folder), load_tokenizer(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if "lte_job" not in meta:
        raise ValueError(
            f"{path}: no 'lte_job' metadata; export the model with lte-server or lte-sim --export"
        )
    job = job_from_dict(json.loads(meta["lte_job"]), source=str(path))
    if job.task != "lm":
        raise ValueError(
            f"{path}: a {job.task or 'non-language'} model ({job.model}); lte-generate needs a GPT"
        )
    with torch.device("meta"):
        model = build_job_model(job)
    if not isinstance(model, GPT):  # every "lm" model of the zoo is one
        raise ValueError(f"{path}: a {job.model} model cannot generate text; lte-generate needs a GPT")
    model = model.to_empty(device="cpu")
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    return model, load_tokenizer(path.parent)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="lte-generate", description="Sample text from an exported LTE language model."
    )
    p.add_argument(
        "--model", required=True, help="model.safetensors of lte-server/lte-sim (tokenizer beside it)"
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
        vocab_size: Any = getattr(model.config, "vocab_size", 0)
        if max(ids) >= int(vocab_size):
            raise ValueError(f"the tokenizer beside {args.model} does not match the model's vocabulary")
    except (ValueError, OSError) as exc:
        print(f"lte-generate: error: {exc}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples)
    if isinstance(model, GPT):
        out = model.generate(  # type: ignore[operator]
            prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen
        )
    else:  # transformers' generate (the config's positions bound the length)
        out = sample_tokens(
            model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed
        )
    for i, row in enumerate(out.tolist()):
        if i:
            print("\n---")
        print(tokenizer.decode(row if args.prompt else row[len(ids) :]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
