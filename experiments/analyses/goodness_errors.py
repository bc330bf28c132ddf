"""The goodness read-out's error on a saved supervised run's own training digits, beside
its validation and test error: how much of the test error is fitting and how much is
generalising. Prints one JSON line.

    python3 -m experiments.analyses.goodness_errors --run runs/label-paper/hard-decay-paper-s0
"""

import argparse
import json
import sys

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
import ff_runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="saved run of ff_label_mnist.py")
    p.add_argument("--data-dir", default=None,
                   help="MNIST folder (default: $MNIST_DIR, else the embedded copy)")
    args = p.parse_args(argv)

    def measure():
        run = ff_runs.load_run(args.run)
        cfg = run.cfg
        if not isinstance(cfg, ff_label.LabelConfig):
            raise ff_runs.SettingsError(f"{args.run} was made by {cfg.SCRIPT}; the goodness "
                                        "read-out needs a run of ff_label_mnist.py")
        x_train, y_train, x_test, y_test = ff.load_mnist(args.data_dir)
        x_fit, y_fit, x_val, y_val = ff.split_validation(x_train, y_train, cfg.val_size,
                                                         cfg.n_train)
        splits = {"train": (x_fit, y_fit), "val": (x_val, y_val), "test": (x_test, y_test)}
        out = {"run": args.run}
        for name, (x, y) in splits.items():
            if len(x):
                out[f"goodness_{name}_error"] = ff_label.goodness_error_rate(
                    run.weights, run.biases, x, y, cfg.goodness, cfg.first_readout_layer,
                    norm=cfg.normalize, kinds=cfg.layer_kinds())
        print(json.dumps(out))
        return 0
    return ff_runs.exit_status(measure)


if __name__ == "__main__":
    sys.exit(main())
