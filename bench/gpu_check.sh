#!/usr/bin/env bash
# Issue 14 acceptance in one prepared run: the mixed-precision worker step against full training,
# worker model state with the frozen-weight cache counted, and the one-head merge against a GEMM.
#
#   bash bench/gpu_check.sh                 # CUDA: vit-b 224/16, batch 64, one head, r 64 (~5 min)
#   bash bench/gpu_check.sh --device cpu    # the same steps at small sizes (vit-tiny 32/4, batch 8)
#
# Raw output goes to $OUT (default bench/results/gpu-check-<device>-<UTC date-time>/); the
# acceptance table is printed, kept as $OUT/acceptance.md and, on CUDA, written into BENCHMARKS.md
# (section gpu-check). Every step has its own time limit, so the run ends within about 8 minutes.
set -u -o pipefail
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:-}; shift 2 || shift ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    *) echo "gpu_check.sh: error: unknown option $1; use --device cuda|cpu" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in
  cuda | cpu) ;;
  *) echo "gpu_check.sh: error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench/results/gpu-check-$DEVICE-$(date -u +%Y-%m-%d-%H%M)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import lte.common.job.precision" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
fi
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
  SIZES=(--model vit-b --image-size 224 --patch-size 16 --batch-size 64 --warmup 3 --steps 10)
  MERGE=(--model vit-b --repeat 20 --heads-per-push 1,4,32)
  LAYER=(--precision bf16 --heads 1,4 --rows 197,12608 --repeat 20)
  LIMIT=80  # four steps: the whole run stays under 6 minutes even if every one hits its limit
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  grep -m1 "model name" /proc/cpuinfo | tee "$OUT/machine.txt"
  SIZES=(--model vit-tiny --image-size 32 --patch-size 4 --batch-size 8 --warmup 1 --steps 3)
  MERGE=(--model vit-tiny --image-size 32 --repeat 3 --heads-per-push 1,4)
  LAYER=(--precision bf16 --heads 1,4 --rows 16,256 --repeat 3)
  LIMIT=300
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())" | tee -a "$OUT/machine.txt"
date -u | tee -a "$OUT/machine.txt"

run() {  # run NAME ARGS...: one step, its log in $OUT/NAME.log, its table appended to tables.md
  local name=$1
  shift
  echo "### $PY $*" | tee -a "$OUT/tables.md"
  timeout "$LIMIT" "$PY" "$@" 2>&1 | grep -v "^USDT:" | tee "$OUT/$name.log" | tee -a "$OUT/tables.md"
  local rc=$?
  if [ $rc -ne 0 ]; then echo "($name: exit $rc)" | tee -a "$OUT/tables.md"; fi
}
run worker_bf16 bench/worker_cost.py "${SIZES[@]}" --device "$DEVICE" --precision bf16 --compare-cache --json-out "$OUT/worker_bf16.json"
run worker_fp16 bench/worker_cost.py "${SIZES[@]}" --device "$DEVICE" --precision fp16 --quants int8 --json-out "$OUT/worker_fp16.json"
run merge bench/merge_cost.py "${MERGE[@]}" --device "$DEVICE" --json-out "$OUT/merge.json"
run layer bench/lte_layer_cost.py "${LAYER[@]}" --device "$DEVICE"

WRITE=()
if [ "$DEVICE" = cuda ]; then WRITE=(--benchmarks BENCHMARKS.md); fi
"$PY" bench/gpu_check_table.py --dir "$OUT" --command "bash bench/gpu_check.sh --device $DEVICE" "${WRITE[@]}" | tee "$OUT/acceptance.md"
