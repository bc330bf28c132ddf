"""Refit the linear softmax head of a saved run with other settings, FF network unchanged.

Separates how much of the test error is the head's (too few epochs, too small a step)
from how much is the features'. The run's own validation split is used (or --val-size);
choose head settings on val_error, not on test_error.

    python3 experiments/refit_head.py --run runs/spec-seed0 --softmax-epochs 50 --softmax-lr 0.5
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ff_hybrid_mnist as ff  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ff.config_default
    p.add_argument("--run", required=True, help="saved run whose head is refitted")
    p.add_argument("--softmax-epochs", type=ff.number_arg(int, 1), default=d("softmax_epochs"),
                   help="epochs of the new head")
    p.add_argument("--softmax-lr", type=ff.number_arg(float, 0, inclusive=False),
                   default=d("softmax_lr"), help="SGD step size of the new head")
    p.add_argument("--softmax-weight-decay", type=ff.number_arg(float, 0),
                   default=d("softmax_weight_decay"), help="L2 penalty of the new head")
    p.add_argument("--top-k", type=ff.number_arg(int, 1), help="default: the run's own")
    p.add_argument("--val-size", type=ff.number_arg(int, 0), help="default: the run's own")
    p.add_argument("--seed", type=int, default=d("seed"),
                   help="seeds the head's batches (as [seed, 1])")
    p.add_argument("--dry-run", action="store_true",
                   help="check the flags and the run, print the settings, exit")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        run = ff.load_run(args.run)
        # the run's configuration with this refit's head settings, checked as a whole
        cfg = dataclasses.replace(
            run.cfg, top_k=args.top_k or run.top_k, seed=args.seed,
            softmax_epochs=args.softmax_epochs, softmax_lr=args.softmax_lr,
            softmax_weight_decay=args.softmax_weight_decay,
            val_size=run.cfg.val_size if args.val_size is None else args.val_size)
    except ValueError as e:
        p.error(str(e))
    except ff.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    top_k, val_size = cfg.top_k, cfg.val_size
    if args.dry_run:
        print(json.dumps({"run": args.run, "config": dataclasses.asdict(cfg)}, indent=1))
        return 0
    x_train, y_train, x_test, y_test = ff.load_mnist()
    x_fit, y_fit, x_val, y_val = ff.split_validation(x_train, y_train, val_size,
                                                     run.cfg.n_train)
    if run.cfg.negatives == "label":  # the softmax read-out sees the neutral label
        x_fit, x_val, x_test = (ff.embed_labels(a, None) for a in (x_fit, x_val, x_test))
    t0 = time.perf_counter()
    local = run.cfg.local
    F_fit = ff.extract_features(run.weights, run.biases, x_fit, top_k, local=local)
    F_test = ff.extract_features(run.weights, run.biases, x_test, top_k, local=local)
    F_val = (ff.extract_features(run.weights, run.biases, x_val, top_k, local=local)
             if val_size else None)
    W, b, hist = ff.train_softmax(F_fit, y_fit, F_test, y_test,
                                  np.random.default_rng([args.seed, 1]), args.softmax_epochs,
                                  args.softmax_lr, args.softmax_weight_decay,
                                  F_val=F_val, y_val=y_val if val_size else None,
                                  log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    result = {"run": args.run, "top_k": top_k, "softmax_epochs": args.softmax_epochs,
              "softmax_lr": args.softmax_lr, "softmax_weight_decay": args.softmax_weight_decay,
              "val_size": val_size,
              "val_error": ff.error_rate(F_val, y_val, W, b) if val_size else None,
              "test_error": ff.error_rate(F_test, y_test, W, b),
              "train_error": ff.error_rate(F_fit, y_fit, W, b),
              "seconds": time.perf_counter() - t0, "environment": ff.environment()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
