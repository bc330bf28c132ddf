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


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ff_hybrid_mnist as ff  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = {name: f.default for name, f in ff.CONFIG_FIELDS.items()}
    p.add_argument("--run", required=True, help="saved run whose head is refitted")
    p.add_argument("--softmax-epochs", type=ff.number_arg(int, 1), default=d["softmax_epochs"],
                   help="epochs of the new head (default: %(default)s)")
    p.add_argument("--softmax-lr", type=ff.number_arg(float, 0, above=True),
                   default=d["softmax_lr"], help="SGD step size of the new head "
                   "(default: %(default)s)")
    p.add_argument("--softmax-weight-decay", type=ff.number_arg(float, 0),
                   default=d["softmax_weight_decay"], help="L2 penalty of the new head "
                   "(default: %(default)s)")
    p.add_argument("--top-k", type=ff.number_arg(int, 1), help="default: the run's own")
    p.add_argument("--val-size", type=ff.number_arg(int, 0), help="default: the run's own")
    p.add_argument("--seed", type=ff.number_arg(int, 0), default=d["seed"],
                   help="seeds the head's batches, as [seed, 1] (default: %(default)s)")
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
            run.cfg, top_k=args.top_k or run.cfg.top_k, seed=args.seed,
            softmax_epochs=args.softmax_epochs, softmax_lr=args.softmax_lr,
            softmax_weight_decay=args.softmax_weight_decay,
            val_size=run.cfg.val_size if args.val_size is None else args.val_size)
    except ValueError as e:
        p.error(str(e))
    except ff.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps({"run": args.run, "config": dataclasses.asdict(cfg)}, indent=1))
        return 0
    try:
        x_train, y_train, x_test, y_test = ff.load_mnist()
        x_fit, y_fit, x_val, y_val = ff.split_validation(x_train, y_train, cfg.val_size,
                                                         run.cfg.n_train)
        splits = [s for s in (("val", x_val, y_val), ("test", x_test, y_test)) if len(s[1])]
        _, _, metrics = ff.fit_head(run.weights, run.biases, cfg, (x_fit, y_fit), splits,
                                    log=lambda *a, **k: print(*a, file=sys.stderr, **k))
    except (ff.DataError, ff.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {"run": args.run, "top_k": cfg.top_k, "softmax_epochs": cfg.softmax_epochs,
              "softmax_lr": cfg.softmax_lr, "softmax_weight_decay": cfg.softmax_weight_decay,
              "val_size": cfg.val_size, "val_error": metrics.get("val_error"),
              "test_error": metrics["test_error"], "train_error": metrics["train_error"],
              "seconds": metrics["softmax_seconds"], "environment": ff.environment()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
