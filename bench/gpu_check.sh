#!/usr/bin/env bash
# The GPU session's one prepared script, for a machine where CuPy is already installed (it
# installs nothing): the GPU tests, the epoch benchmark at two widths, then real runs in the
# time left, everything written into OUT. At most 9 minutes in all (BUDGET_S, default 540),
# so that one run and one rerun fit in 15 minutes of device time.
#
#   bash bench/gpu_check.sh OUT            # on the GPU machine
#   bash bench/gpu_check.sh OUT --dry-run  # here: every command checked on the CPU, quickly
#
# Each step gets what is left of the budget as its timeout and is skipped when less is left
# than it needs; OUT/steps.txt says what ran, how long it took and its exit status. Run
# folders are OUT/runs/NAME; each finished one holds its metrics.json.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT [--dry-run]}
dry=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out/runs"
budget=${BUDGET_S:-540}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

step() {  # step NAME NEEDS_S COMMAND...: run it if NEEDS_S seconds are left
  local name=$1 needs=$2; shift 2
  if [ "$dry" != "--dry-run" ] && [ "$(left)" -lt "$needs" ]; then
    echo "$name skipped: $(left) s left, needs $needs" | tee -a "$out/steps.txt"
    return
  fi
  local t0; t0=$(date +%s)
  timeout "$(( $(left) > 5 ? $(left) : 5 ))" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc $rc $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"
}

train() {  # train NAME NEEDS_S FLAGS...: a training run on the GPU (--dry-run: checked here)
  local name=$1 needs=$2; shift 2
  # the flags are the one trainer's of before the split: ff_runs.script_for picks the script
  local line; line=$(python3 -c 'import shlex, sys, ff_runs; s, a = ff_runs.script_for(sys.argv[1:]); print(shlex.join([s] + a))' "$@")
  eval "set -- $line"; local script=$1; shift
  if [ "$dry" = "--dry-run" ]; then
    step "$name" 0 python3 "$script" "$@" --device cpu --checkpoint-every 10 \
      --out "$out/runs/$name" --dry-run
  else
    # a checkpoint every 10 epochs (and after the last): writing one costs about an epoch here
    step "$name" "$needs" python3 "$script" "$@" --device gpu --checkpoint-every 10 \
      --out "$out/runs/$name"
  fi
}

# what a step asks of the GPU, counted on the CPU's stand-in (seconds; no GPU needed)
step launches 0 python3 -m bench.count_launches
if [ "$dry" = "--dry-run" ]; then
  step tests 0 python3 -m pytest -q --collect-only tests/test_gpu.py
  step bench-1000 0 python3 -m bench.bench_epoch --layer-sizes 784,50,50 --n-train 1000 \
    --epochs 1 --repeats 1 --part-steps 2
else
  python3 -c "import ff_hybrid_mnist as ff; print(ff.gpu_problem() or 'gpu ok')" \
    | tee "$out/gpu_problem.txt"
  step tests 120 python3 -m pytest -q -rs tests/test_gpu.py
  step bench-1000 60 python3 -m bench.bench_epoch --device gpu --layer-sizes 784,1000,1000,1000,1000
  step bench-2000 60 python3 -m bench.bench_epoch --device gpu --layer-sizes 784,2000,2000,2000,2000
fi

# first what the CPU needs hours for, each read out by the converged head (the default):
# the unsupervised 784-2000x4 row at the paper's 100 epochs with the author's machinery for
# hybrids (his supervised recipe's FF flags: RMS inputs, fan-in init, sum goodness with the
# threshold at the number of units, smoothed SGD whose weight cost shrinks lr x wd = 1e-5 a
# step, the rate halved-then-linear to 0, his peer term), its rate chosen at 20 epochs among
# three on validation; then today's best with weight cost and the rate decayed (Adam)
author="--optimizer sgd --normalize rms --init fan-in --goodness sum --threshold 1 \
  --lr-decay linear-half-epochs --peer-norm 0.06 --peer-kind author"
for lr in 0.0025 0.005 0.01; do
  wd=$(python3 -c "print(1e-5 / $lr)")
  # shellcheck disable=SC2086
  train "hybrid-author-lr$lr-e20" 120 --layer-sizes 784,2000,2000,2000,2000 --n-epochs 20 \
    $author --lr "$lr" --weight-decay "$wd" --n-blur 2 --top-k 4 --val-size 10000 --seed 0
done
train "paper100-wd-decay-s0" 300 --layer-sizes 784,2000,2000,2000,2000 --n-epochs 100 \
  --batch-size 50 --n-blur 2 --threshold 8 --weight-decay 0.003 --lr-decay linear-half \
  --top-k 4 --val-size 10000 --seed 0
# the reference configuration, 3 seeds, read out by the converged head
for s in 0 1 2; do
  train "ref-s$s" 60 --seed "$s"
done
# the paper's locally-connected network at 60 epochs with the peer normalisation validation
# chose on the CPU (experiments/sweeps/lists/sweep_local_paper_net_seeds.txt), read out by the converged head
for s in 0 1 2; do
  train "lcp-e60-s$s" 150 --local 10:6:128,2:1:220,2:1:512 --threshold 8 \
    --top-k 3 --val-size 10000 --batch-size 50 --n-blur 2 --peer-norm 0.03 --n-epochs 60 \
    --seed "$s"
done
# the supervised recipe at the paper's shape, 60 epochs (experiments/sweeps/lists/sweep_recipe_2000x4.txt)
for s in 0 1 2; do
  train "recipe2000-s$s" 240 --negatives label --hard-negatives --hard-from head --optimizer sgd \
    --normalize rms --init fan-in --goodness sum --threshold 1 --peer-norm 0.06 \
    --peer-kind author --lr 0.005 --weight-decay 0.002 --lr-decay linear-half-epochs \
    --hard-head-lr 0.1 --hard-head-weight-decay 0.003 --layer-sizes 784,2000,2000,2000,2000 \
    --batch-size 100 --n-epochs 60 --val-size 10000 --softmax-epochs 0 --seed "$s"
done
# the supervised recipe as released, 784-1000x3, 100 epochs (experiments/sweeps/lists/sweep_recipe_1000x3.txt)
for s in 0 1 2; do
  train "recipe-s$s" 150 --negatives label --hard-negatives --hard-from head --optimizer sgd \
    --normalize rms --init fan-in --goodness sum --threshold 1 --peer-norm 0.06 \
    --peer-kind author --lr 0.005 --weight-decay 0.002 --lr-decay linear-half-epochs \
    --hard-head-lr 0.1 --hard-head-weight-decay 0.003 --layer-sizes 784,1000,1000,1000 \
    --batch-size 100 --n-epochs 100 --val-size 10000 --softmax-epochs 0 --seed "$s"
done
# the recurrent network with top-down connections (ff_recurrent_mnist.py, docs/recurrent.md)
# at the paper's three hidden layers of 2000, a short run with the validation split
recurrent="--layer-sizes 784,2000,2000,2000 --hard-negatives --n-epochs 5 --val-size 10000 --seed 0"
if [ "$dry" = "--dry-run" ]; then
  # shellcheck disable=SC2086
  step recurrent2000-e5 0 python3 ff_recurrent_mnist.py $recurrent --device cpu \
    --checkpoint-every 10 --out "$out/runs/recurrent2000-e5" --dry-run
else
  # shellcheck disable=SC2086
  step recurrent2000-e5 150 python3 ff_recurrent_mnist.py $recurrent --device gpu \
    --checkpoint-every 10 --out "$out/runs/recurrent2000-e5"
fi
echo "done in $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
