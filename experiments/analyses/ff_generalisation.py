"""The FF objective of a saved hybrid run on its own training digits beside held-out
validation digits, the weights frozen: per layer, the FF loss and the accuracy of telling
real digits from hybrids at the threshold. A gap between the two splits is the FF layers
fitting their training digits rather than digits in general. Prints one JSON line.

    python3 -m experiments.analyses.ff_generalisation --run runs/paper100/paper100-s0
"""

import argparse
import json
import sys

import numpy as np

import ff_devices
import ff_hybrid_mnist as ff
import ff_runs
import visualize_ff_hybrid_mnist as viz


def split_objective(run, x, n, rng):
    """Per layer (loss, accuracy) on n real digits of x and n hybrids of pairs of x."""
    cfg = run.cfg
    real, hybrids = viz.evaluation_set(x, n, rng, cfg.n_blur)
    rows = np.concatenate([real, hybrids])
    losses, accuracies = [], []
    for l, h in enumerate(ff.network_activities(run.weights, run.biases, rows,
                                                norm=cfg.normalize,
                                                kinds=cfg.layer_kinds())):
        threshold = cfg.layer_threshold(h.shape[1])
        loss, g = ff.ff_loss_and_dz(h, n, threshold, cfg.goodness, np.empty_like(h))
        g = ff_devices.to_host(g)
        losses.append(float(loss))
        accuracies.append(float(((g[:n] > threshold).mean() + (g[n:] < threshold).mean()) / 2))
    return losses, accuracies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="saved run trained with hybrid negatives, or a run in progress "
                   "(its checkpoint's network)")
    p.add_argument("--n", type=ff_runs.number_arg(int, 1), default=10000,
                   help="real digits (and as many hybrids) per split (default: %(default)s)")
    p.add_argument("--seed", type=ff_runs.number_arg(int, 0), default=0,
                   help="seeds the digits drawn and the hybrids' masks (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="MNIST folder (default: $MNIST_DIR, else the embedded copy)")
    args = p.parse_args(argv)

    def measure():
        run = ff_runs.load_network(args.run)
        cfg = run.cfg
        if cfg.negatives != "hybrid":
            raise ff_runs.SettingsError(f"{args.run} was made by {cfg.SCRIPT}, whose negatives "
                                        f"are {cfg.negatives}; this measures the hybrid "
                                        "objective")
        if not cfg.val_size:
            raise ff_runs.SettingsError(f"{args.run} held out no validation digits "
                                        "(--val-size 0)")
        x_train, y_train, _, _ = ff.load_mnist(args.data_dir)
        x_fit, _, x_val, _ = ff.split_validation(x_train, y_train, cfg.val_size, cfg.n_train)
        out = {"run": args.run, "ff_epochs": len(run.ff_history["loss"]), "n": args.n}
        for name, x in (("train", x_fit), ("val", x_val)):
            # the same seed for both splits: the same masks, only the digits differ
            loss, accuracy = split_objective(run, x, args.n, np.random.default_rng(args.seed))
            out[f"{name}_ff_loss"], out[f"{name}_real_vs_hybrid_accuracy"] = loss, accuracy
        print(json.dumps(out))
        return 0
    return ff_runs.exit_status(measure)


if __name__ == "__main__":
    sys.exit(main())
