#!/usr/bin/env bash
# Run the lines of a backprop sweep list (LABEL ARGS...) one after another, one BLAS thread,
# each record appended to RESULTS and each log to LOGDIR/LABEL.log; a label already in
# RESULTS is skipped, so the same command continues an interrupted list. Run it from the
# repository root (each line runs as python3 -m experiments.baselines.backprop_baseline):
#   experiments/baselines/run_backprop_list.sh experiments/baselines/sweep_backprop.txt \
#       experiments/results/backprop-baseline.jsonl runs/backprop
set -euo pipefail
list=$1 results=$2 logdir=${3:-runs/backprop}
mkdir -p "$logdir"
grep -v '^\s*#' "$list" | grep -v '^\s*$' | while read -r label args; do
  if [ -f "$results" ] && grep -q "\"label\": \"$label\"" "$results"; then
    echo "$label: recorded already"; continue
  fi
  echo "$label: started $(date +%T)"
  # shellcheck disable=SC2086
  OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python3 -m experiments.baselines.backprop_baseline \
      $args --label "$label" --out "$results" > "$logdir/$label.log" 2>&1 \
      || echo "$label: failed, see $logdir/$label.log"
done
