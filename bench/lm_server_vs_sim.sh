#!/bin/bash
# gpt-micro on KJV: the LTE job at 1.0x tokens over a real lte-server (2 local workers, int8), then lte-sim with the same flags
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
JOB="--model gpt-micro --dataset text --data-dir ${KJV:-data/kjv} --heads 8 --rank 64 --alpha 1024 --lr 3e-4 --merge-every 8 --steps 80 --batch-size 4 --seed 0"
date -u
/usr/bin/time -f "%e s wall" lte-server $JOB --quant int8 --local-workers 2 --port 0 --dashboard-port -1 --eval-every 0 --threads 1 --json --quiet --out ${OUT:-runs/lm-server}
date -u
/usr/bin/time -f "%e s wall" lte-sim $JOB --quant int8 --workers 2 --threads 1 --quiet --json
date -u
