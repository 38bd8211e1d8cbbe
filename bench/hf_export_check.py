"""Check an lte-server run of a ``hf:`` model against lte-sim's export of the same job (issue 22).

    python bench/hf_export_check.py SIM_MODEL.safetensors SERVER_RUN_FOLDER TOKEN_DATA_FOLDER

Prints one JSON line: whether the two exports are equal bit for bit (and the largest difference),
the max abs difference between the logits of the server's ``hf/`` folder loaded with
``AutoModelForCausalLM.from_pretrained`` and of the lte export loaded into the job's model on a
fixed batch (two windows of the run's val.bin), whether ``AutoTokenizer`` gives lte's token ids,
and a greedy ``model.generate`` continuation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lte.common.core.outputs import forward_logits
from lte.common.data.text import load_tokenizer, read_meta
from lte.common.job.config import job_from_dict
from lte.common.job.trainer import build_job_model


def main() -> None:
    sim_file, run, data = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    server_file = run / "model.safetensors"
    sim, server = load_file(str(sim_file)), load_file(str(server_file))
    equal = set(sim) == set(server) and all(torch.equal(sim[k], server[k]) for k in sim)
    worst = max(float((sim[k] - server[k]).abs().max()) for k in sim)
    with safe_open(str(server_file), "pt") as fh:
        job = job_from_dict(json.loads(fh.metadata()["lte_job"]))
    ref = build_job_model(job, seed=99)
    ref.load_state_dict(server, strict=True)
    ref.eval()
    hf = AutoModelForCausalLM.from_pretrained(str(run / "hf"), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(run / "hf"), local_files_only=True)
    val = np.fromfile(data / "val.bin", dtype=read_meta(data)["dtype"])
    ids = torch.tensor(np.stack([val[:64], val[1000:1064]]).astype(np.int64))
    with torch.no_grad():
        diff = float((hf(ids).logits - forward_logits(ref, ids)).abs().max())
    text = "And God said, Let there be light: and there was light.\n"
    same_ids = tok(text)["input_ids"] == load_tokenizer(run).encode(text)
    prompt = torch.tensor([load_tokenizer(run).encode("And God said")])
    out = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    print(json.dumps({
        "exports_bit_identical": equal, "max_abs_weight_diff": worst, "hf_vs_lte_logits_max_abs_diff": diff,
        "tokenizer_same_ids": same_ids, "generate": tok.decode(out[0]),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
