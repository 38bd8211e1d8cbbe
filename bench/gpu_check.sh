#!/usr/bin/env bash
# One prepared GPU run of the worker benchmarks (issue 6, item 6): worker memory and step time
# (fp32 and bf16 autocast) and the server merge, for vit-b. Writes tables to $OUT (or ./gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
run() { echo "### $*" | tee -a "$OUT/tables.md"; timeout 240 "$@" 2>&1 | tee -a "$OUT/tables.md"; }
run python3 bench/worker_cost.py --model vit-b --device cuda --image-size 224 --patch-size 16 --batch-size 64 --warmup 3 --steps 10 --eager-build --json-out "$OUT/worker_fp32.json"
run python3 bench/worker_cost.py --model vit-b --device cuda --image-size 224 --patch-size 16 --batch-size 64 --warmup 3 --steps 10 --amp --cache-frozen --json-out "$OUT/worker_bf16.json"
run python3 bench/merge_cost.py --model vit-b --device cuda --repeat 20 --heads-per-push 1,4,32
run python3 bench/merge_cost.py --model vit-b --device cpu --repeat 3 --heads-per-push 1,4,32
