#!/usr/bin/env bash
# Issue 15 on one GPU in one prepared, bounded run: the acceptance sweep of bench/quality.py.
#
#   bash bench/quality_gpu.sh [--deadline SECONDS] [--parallel K] [--data-dir DIR] [--mps] [--device D]
#                             [--queue FILE]
#
# vit-micro on Fashion-MNIST at 1500 steps of 128 samples (3.2 epochs): full training at three
# learning rates against LTE (N 8, T 10, r 64 so that N * r = 512 = the MLP width) at 1.3x the
# samples, seeds 0 and 1; then vit-tiny, full against LTE (r 96: N * r = 768), 1400 steps, seed 0.
# Every (run, seed) is its own `bench/quality.py` process, K at a time, in the priority order
# below (seed 0 of everything before seed 1), so a run cut short by the deadline loses the least
# useful rows. At the deadline the processes still running are stopped; the table holds what
# finished (one JSON line per finished run, in $OUT/quality-<model>.jsonl).
# Exit status: 0 when every run of the queue finished, 1 when any failed, was stopped or never
# started (the table still holds the finished ones), 2 for bad options or a bad queue file.
# --mps starts NVIDIA's multi-process service first (many small processes then share the GPU
# without context switches) and falls back to plain time-slicing if it does not start.
# --device cpu with --steps-scale makes the same run small enough to check on a CPU.
# --queue FILE replaces the sweep: one run per line, as `bench/quality.py` arguments (--model,
# --steps, --seeds, --run, and --dataset, --data-dir, --heads ... where they differ from its
# defaults); '#' lines are skipped. Results go to $OUT/quality-<model>-<steps>.jsonl.
set -u -o pipefail
DEADLINE=420
PARALLEL=8
DATA_DIR=/usr/share/datasets/fashion-mnist
DEVICE=cuda
MPS=0
SCALE=100
QUEUE_FILE=
fail() { echo "quality_gpu.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --mps) MPS=1; shift; continue ;;
    --deadline | --parallel | --data-dir | --device | --steps-scale | --queue)
      [ $# -ge 2 ] || fail "$1 needs a value (see the header of this file)" ;;
  esac
  case "$1" in
    --deadline) DEADLINE=$2 ;;
    --parallel) PARALLEL=$2 ;;
    --data-dir) DATA_DIR=$2 ;;
    --device) DEVICE=$2 ;;
    --steps-scale) SCALE=$2 ;;
    --queue) QUEUE_FILE=$2 ;;
    *) fail "unknown option $1 (see the header of this file)" ;;
  esac
  shift 2
done
for pair in "--deadline $DEADLINE" "--parallel $PARALLEL" "--steps-scale $SCALE"; do
  case "${pair#* }" in '' | *[!0-9]*) fail "$pair: must be a whole number" ;; esac
done
[ "$PARALLEL" -ge 1 ] || fail "--parallel $PARALLEL: must be at least 1"
has_word() {  # has_word WORD LINES: whether one of the newline-separated LINES is WORD
  case $'\n'"$2"$'\n' in *$'\n'"$1"$'\n'*) return 0 ;; esac
  return 1
}
QUEUE=()  # one line of bench/quality.py arguments per run, in priority order
if [ -n "$QUEUE_FILE" ]; then  # read before the cd below: a relative path is the caller's
  [ -f "$QUEUE_FILE" ] && [ -r "$QUEUE_FILE" ] || fail "--queue $QUEUE_FILE: no such readable file"
  number=0
  while IFS= read -r line || [ -n "$line" ]; do
    number=$((number + 1))
    trimmed=${line#"${line%%[![:space:]]*}"}
    case "$trimmed" in '' | '#'*) continue ;; esac
    # split as one() will (quotes group a --run's words); the results file is named after the
    # line's --model and --steps, so both must be there
    words=$( (eval "set -- $line" && printf '%s\n' "$@") 2>/dev/null) ||
      fail "--queue $QUEUE_FILE line $number: unbalanced quotes or shell syntax: $line"
    has_word --model "$words" || fail "--queue $QUEUE_FILE line $number: no '--model NAME': $line"
    has_word --steps "$words" || fail "--queue $QUEUE_FILE line $number: no '--steps N': $line"
    QUEUE+=("$line")
  done <"$QUEUE_FILE"
  [ ${#QUEUE[@]} -gt 0 ] || fail "--queue $QUEUE_FILE: no runs in it (only blank or '#' lines)"
fi
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-bench/results/quality-$DEVICE-$(date -u +%Y-%m-%d-%H%M)}
mkdir -p "$OUT/logs"
rm -f "$OUT/logs/exit-codes"  # this run's exit codes only
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
START=$SECONDS
END=$((START + DEADLINE))

if [ "$MPS" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/lte-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/lte-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if command -v nvidia-cuda-mps-control >/dev/null && timeout 20 nvidia-cuda-mps-control -d \
    && timeout 60 "$PY" -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2"; then
    echo "MPS: on"
  else
    echo "MPS: not available here; processes share the GPU by time-slicing"
    echo quit | timeout 10 nvidia-cuda-mps-control 2>/dev/null
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi

scaled() { echo $(($1 * SCALE / 100)); }  # --steps-scale is a percentage
MICRO=$(scaled 1500)
TINY=$(scaled 1400)
if [ -z "$QUEUE_FILE" ]; then
  for seed in 0 1; do
    for run in "full lr=1e-3" "lte rank=64 alpha=256 lr=1e-3 x=1.3" "lte rank=64 alpha=128 lr=1e-3 x=1.3" \
      "lte rank=64 alpha=64 lr=2e-3 x=1.3"; do
      QUEUE+=("--model vit-micro --steps $MICRO --seeds $seed --data-dir $DATA_DIR --run '$run'")
    done
    if [ $seed = 0 ]; then
      for run in "full lr=1e-3" "lte rank=96 alpha=384 lr=1e-3 x=1.3"; do
        QUEUE+=("--model vit-tiny --steps $TINY --seeds 0 --data-dir $DATA_DIR --run '$run'")
      done
    fi
    for run in "full lr=3e-4" "full lr=2e-3" "lte rank=64 alpha=256 lr=5e-4 x=1.3" "lte rank=64 alpha=128 lr=2e-3 x=1.3" \
      "lte rank=64 alpha=64 lr=4e-3 x=1.3" "lte rank=64 alpha=512 lr=5e-4 x=1.3" "lte rank=16 alpha=64 lr=1e-3 x=1.3"; do
      QUEUE+=("--model vit-micro --steps $MICRO --seeds $seed --data-dir $DATA_DIR --run '$run'")
    done
  done
fi

one() {  # one queue line (bench/quality.py arguments), bounded by the deadline
  local line=$1 left=$((END - SECONDS)) tag model="" steps=""
  eval "set -- $line"
  local args=("$@")
  while [ $# -gt 0 ]; do
    case "$1" in
      --model) model=$2; shift ;;
      --steps) steps=$2; shift ;;
    esac
    shift
  done
  tag=$(echo "$line" | tr -c 'A-Za-z0-9.\n-' '_' | cut -c1-150)
  if [ $left -lt 10 ]; then return 0; fi
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=30 "$left" "$PY" bench/quality.py --device "$DEVICE" "${args[@]}" \
    --results "$OUT/quality-$model-$steps.jsonl" >"$OUT/logs/$tag.log" 2>&1
  local rc=$?
  echo "$rc" >>"$OUT/logs/exit-codes"
  echo "[$((SECONDS - START)) s] $line: exit $rc after $((SECONDS - t0)) s: $(grep -m1 -E ' seed [0-9]+: |rror' "$OUT/logs/$tag.log")"
}

echo "$(date -u) $DEVICE, ${#QUEUE[@]} runs, $PARALLEL at a time, deadline $DEADLINE s"
running=0
for item in "${QUEUE[@]}"; do
  if [ $((END - SECONDS)) -lt 10 ]; then break; fi
  one "$item" &
  running=$((running + 1))
  if [ $running -ge "$PARALLEL" ]; then
    wait -n
    running=$((running - 1))
  fi
done
wait
if [ "$MPS" = 1 ] && [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]; then echo quit | timeout 10 nvidia-cuda-mps-control; fi
for results in "$OUT"/quality-*.jsonl; do
  [ -s "$results" ] || continue
  name=$(basename "$results" .jsonl)
  steps=${name##*-}
  model=${name#quality-}
  model=${model%-"$steps"}
  "$PY" bench/quality.py --model "$model" --steps "$steps" --results "$results" --table-only | tee "$OUT/table-$model-$steps.md"
done
finished=$(grep -c '^0$' "$OUT/logs/exit-codes" 2>/dev/null)
echo "done in $((SECONDS - START)) s: ${finished:-0} of ${#QUEUE[@]} runs finished"
if [ "${finished:-0}" -lt ${#QUEUE[@]} ]; then
  echo "quality_gpu.sh: $((${#QUEUE[@]} - ${finished:-0})) run(s) failed, were stopped at the deadline or never started; logs in $OUT/logs" >&2
  exit 1
fi
