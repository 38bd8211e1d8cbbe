#!/bin/bash
# Hugging Face models on KJV (issue 22's acceptance): GPT-2 (Conv1D, tied), Llama (tied) and Llama
# untied, 2 layers, width 128, vocabulary 256 (byte tokens), each trained by lte-sim --workers 2 and
# by a real lte-server with two lte-worker processes (--local-workers 2), fp32 uplink, no quantisation,
# one thread everywhere; then: both exports compared bit for bit, and the server's hf/ folder loaded
# with transformers (bench/hf_export_check.py: logits against the lte export, generate, tokenizer).
#   bash bench/hf_models.sh          (OUT=runs/hf-bench KJV=data/kjv STEPS=200)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-runs/hf-bench} KJV=${KJV:-data/kjv} STEPS=${STEPS:-200} MODELS=${MODELS:-gpt2 llama llama-untied}
mkdir -p "$OUT/configs"
python - "$OUT/configs" <<'PY'
import sys
from transformers import GPT2Config, LlamaConfig
out = sys.argv[1]
# no dropout: it draws from each process's generator, so with it no two runs (and no sim and
# server) can agree bit for bit; lte's own models have none (common/job/models.py)
GPT2Config(vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4, bos_token_id=None,
           eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(f"{out}/gpt2")
for name, tied in (("llama", True), ("llama-untied", False)):
    LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                bos_token_id=None, eos_token_id=None, tie_word_embeddings=tied).save_pretrained(f"{out}/{name}")
PY
for m in $MODELS; do
  JOB="--model hf:$OUT/configs/$m --dataset text --data-dir $KJV --context 64 --heads 4 --rank 16 --alpha 64 --lr 3e-3 --merge-every 10 --steps $STEPS --batch-size 4 --seed 0 --uplink fp32 --quant none"
  echo "== $m"
  lte-sim $JOB --explain-model | tail -1
  date -u
  /usr/bin/time -f "%e s wall (lte-sim)" lte-sim $JOB --workers 2 --threads 1 --quiet --json --export "$OUT/$m-sim/model.safetensors"
  date -u
  /usr/bin/time -f "%e s wall (lte-server)" lte-server $JOB --local-workers 2 --threads 1 --port 0 --dashboard-port -1 --eval-every 0 --json --quiet --out "$OUT/$m-server"
  python bench/hf_export_check.py "$OUT/$m-sim/model.safetensors" "$OUT/$m-server" "$KJV"
done
