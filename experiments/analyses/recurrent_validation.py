"""Choose a setting of ff_recurrent_mnist.py on the validation split, never the test set.

Trains the recurrent network through the one training loop on the first --n-train digits
(the last 10,000 training digits held out, as --val-size 10000 holds them out) and prints
one JSON line: the setting, the goodness read-out's validation error, the seconds. The test
set is not read.

    OPENBLAS_NUM_THREADS=1 python3 -m experiments.analyses.recurrent_validation --lr 0.01 \
        --layer-sizes 784,500,500 --n-train 10000 --n-epochs 2
"""

import argparse
import json
import sys
import time

import numpy as np

import ff_hybrid_mnist as ff
import ff_recurrent_mnist as rec
import ff_runs

VAL_SIZE = 10000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer-sizes", type=ff_runs.layer_sizes_arg, default=(784, 500, 500))
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--threshold", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hard-negatives", action="store_true",
                   help="wrong labels drawn from the network's preference (the paper's)")
    p.add_argument("--out", help="append the JSON line to this file too")
    args = p.parse_args(argv)
    cfg = rec.RecurrentConfig(layer_sizes=args.layer_sizes, n_train=args.n_train,
                              n_epochs=args.n_epochs, lr=args.lr, threshold=args.threshold,
                              seed=args.seed, val_size=VAL_SIZE,
                              hard_negatives=args.hard_negatives)
    x_train, y_train, _, _ = ff.load_mnist()
    x_fit, y_fit, x_val, y_val = ff.split_validation(x_train, y_train, VAL_SIZE, args.n_train)
    state = ff.FFState.fresh(cfg, np.random.default_rng(cfg.seed))
    t0 = time.perf_counter()
    ff.train_ff(x_fit, cfg, state, y_train=y_fit, log=lambda *a, **k: None)
    train_seconds = time.perf_counter() - t0
    error = rec.goodness_error_rate(state.weights, state.biases, x_val, y_val, cfg)
    record = {"script": "experiments/analyses/recurrent_validation.py",
              "command": "python3 -m experiments.analyses.recurrent_validation " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "config": ff_runs.config_record(cfg), "goodness_val_error": error,
              "ff_loss": state.history["loss"][-1], "train_seconds": train_seconds,
              "seconds": time.perf_counter() - t0, "environment": ff_runs.environment()}
    line = json.dumps(ff_runs.finite_or_none(record))
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
