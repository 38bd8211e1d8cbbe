"""Loss curves: a Hugging Face Llama against lte's gpt-micro of the same size, LTE and full training
(issue 22), on the same KJV byte tokens, samples and budget, with ``lte-sim``'s own code paths.

The Llama: 4 layers, width 128, 4 attention heads, tied embeddings, vocabulary 256, and a SwiGLU
MLP of ``--llama-mlp`` (default 341): its three ``128 x 341`` matrices hold 130,944 weights per
block, gpt-micro's two ``128 x 512`` ones 131,072, so both models have about the same size
(gpt-micro: 4 layers, width 128, 4 heads, MLP 512, tied, learned positions). ``--llama-mlp 512``
gives the earlier, larger Llama (3 x 128 x 512 per block). Each model's parameter count (tied
weights once) is printed and recorded. LTE: rank 64, alpha 1024, lr 3e-4; full: lr 1e-3
(BENCHMARKS.md's gpt-micro settings on KJV).

    python bench/hf_curves.py --data-dir data/kjv --steps 96 --out bench/results/hf-curves.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from lte.commands.sim import run_full, run_lte
from lte.common.data.text import load_text
from lte.common.job.config import JobConfig
from lte.common.job.trainer import build_job_model


def parameter_count(job: JobConfig) -> int:
    """The plain model's parameters, a tied table and output layer counted once."""
    return sum(p.numel() for p in build_job_model(job).parameters())  # parameters() yields a tie once


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="data/kjv")
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--merge-every", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=3, help="rounds between evaluations")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--llama-mlp", type=int, default=341,
                   help="the Llama's intermediate_size [341: about gpt-micro's MLP weights; 512: 1.5x them]")  # fmt: skip
    p.add_argument("--out", default="bench/results/hf-curves.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import LlamaConfig

    folder = tempfile.mkdtemp(prefix="hf-curves-")
    LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=args.llama_mlp, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                bos_token_id=None, eos_token_id=None, tie_word_embeddings=True).save_pretrained(folder)  # fmt: skip
    data = load_text(args.data_dir, eval_tokens=args.eval_tokens)
    rows = []
    for model in ("gpt-micro", f"hf:{folder}"):
        for method in ("lte", "full"):
            values = dict(model=model, dataset="text", heads=args.heads, batch_size=args.batch_size,
                          context=args.context, merge_every=args.merge_every, steps=args.steps, seed=0,
                          uplink="fp32", lr=3e-4 if method == "lte" else 1e-3, rank=64, alpha=1024.0)  # fmt: skip
            job = JobConfig(**values).with_dataset(data)
            parameters = parameter_count(job)
            start = time.perf_counter()
            run = run_lte if method == "lte" else run_full
            result = run(job, data, eval_every=args.eval_every)
            name = "hf-llama" if model.startswith("hf:") else model
            rows.append({"model": name, "method": method, "parameters": parameters, "lr": job.lr,
                         "seconds": time.perf_counter() - start,
                         "history": [{k: h.get(k) for k in ("version", "samples", "train_loss", "test_loss")}
                                     for h in result.history]})  # fmt: skip
            print(
                json.dumps(
                    {k: v for k, v in rows[-1].items() if k != "history"} | {"final": rows[-1]["history"][-1]}
                ),
                flush=True,
            )
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "runs": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
