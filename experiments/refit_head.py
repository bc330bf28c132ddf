"""Refit the linear softmax head of a saved run with other settings, FF network unchanged.

Separates how much of the test error is the head's (too few epochs, too small a step)
from how much is the features'.

    python3 experiments/refit_head.py --run runs/spec-seed0 --softmax-epochs 50 --softmax-lr 0.5
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ff_hybrid_mnist as ff  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--softmax-epochs", type=int, default=50)
    p.add_argument("--softmax-lr", type=float, default=0.05)
    p.add_argument("--softmax-weight-decay", type=float, default=1e-4)
    p.add_argument("--top-k", type=int, help="default: the run's own")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run = ff.load_run(args.run)
    top_k = args.top_k or run.top_k
    x_train, y_train, x_test, y_test = ff.load_mnist()
    n = run.args["n_train"]
    t0 = time.perf_counter()
    F_train = ff.extract_features(run.weights, run.biases, x_train[:n], top_k)
    F_test = ff.extract_features(run.weights, run.biases, x_test, top_k)
    W, b, hist = ff.train_softmax(F_train, y_train[:n], F_test, y_test,
                                  np.random.default_rng([args.seed, 1]), args.softmax_epochs,
                                  args.softmax_lr, args.softmax_weight_decay)
    result = {"run": args.run, "top_k": top_k, "softmax_epochs": args.softmax_epochs,
              "softmax_lr": args.softmax_lr, "softmax_weight_decay": args.softmax_weight_decay,
              "test_error": ff.error_rate(F_test, y_test, W, b),
              "train_error": ff.error_rate(F_train, y_train[:n], W, b),
              "best_epoch_test_error": min(hist["test_error"]),
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
