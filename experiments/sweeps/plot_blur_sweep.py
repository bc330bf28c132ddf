"""Validation error against n_blur, from the n_blur sweep's records (viz/blur_sweep.png).

Reads the JSON-lines file that experiments/sweeps/sweep.py wrote for sweep_val_blur.txt and
plots the validation error per n_blur (the test error beside it, faint), and the last epoch's
real-vs-hybrid accuracy of each layer: how hard the negatives are. Records of another
sweep (runs that differ in more than --n-blur, label runs) are refused in one line.

    python3 -m experiments.sweeps.plot_blur_sweep experiments/results/sweep-val-blur.jsonl
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.records import (OneLineParser, RecordsError, check_figure,  # noqa: E402
                                 finished, main_of, one_experiment, option, read_records)

EXPECTS = ("plot_blur_sweep.py expects two or more finished hybrid-negative runs with a "
           "validation split that differ in --n-blur alone, as "
           "experiments/sweeps/lists/sweep_val_blur.txt makes them "
           "(experiments/results/sweep-val-blur.jsonl)")
FINISHED = {"metrics": {"test_error": float, "val_error?": (float, None),
                        "real_vs_hybrid_accuracy?": ([float], None)}}


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSON-lines files written by sweep.py")
    p.add_argument("--out", default="viz/blur_sweep.png")
    args = p.parse_args(argv)
    return main_of(lambda: plot(args))


def sweep_rows(records):
    """The runs of one n_blur sweep, by n_blur; records of another sweep (runs that differ
    in more than --n-blur, label runs, one n_blur twice) are refused, not drawn."""
    rows = [r for r in finished(records) if r["metrics"].get("val_error") is not None]
    if len(rows) < 2:
        raise RecordsError(f"need at least two finished runs with a validation split: {EXPECTS}")
    one_experiment(rows, "--n-blur", 6, EXPECTS)
    for r in rows:
        if r["metrics"].get("real_vs_hybrid_accuracy") is None:
            raise RecordsError(f"{r.where} has no real-vs-hybrid accuracy (not a "
                               f"hybrid-negative run): {EXPECTS}")
    return sorted(rows, key=lambda r: option(r, "--n-blur", 6))


def plot(args):
    check_figure(args.out)
    rows = sweep_rows(read_records(args.results, FINISHED))
    n_blur = [option(r, "--n-blur", 6) for r in rows]
    val = [100 * r["metrics"]["val_error"] for r in rows]
    test = [100 * r["metrics"]["test_error"] for r in rows]
    acc = [[100 * a for a in r["metrics"]["real_vs_hybrid_accuracy"]] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(n_blur, val, "o-", label="validation error (chooses)")
    ax1.plot(n_blur, test, "s--", alpha=0.4, color="tab:blue", label="test error (reported only)")
    for x, y in zip(n_blur, val):
        ax1.annotate(f"{y:.2f}%", (x, y), textcoords="offset points", xytext=(0, 7),
                     ha="center", fontsize=8)
    ax1.set(xlabel="n_blur (passes of the [1/4, 1/2, 1/4] kernel)", ylabel="error (%)",
            title="linear softmax on the top 3 layers", xticks=n_blur)
    ax1.legend(fontsize=8)
    for l in range(len(acc[0])):
        ax2.plot(n_blur, [a[l] for a in acc], "o-", label=f"layer {l + 1}")
    ax2.set(xlabel="n_blur", ylabel="real-vs-hybrid accuracy, last epoch (%)",
            title="how hard the negatives are", xticks=n_blur)
    ax2.legend(fontsize=8)
    a = rows[0]
    fig.suptitle(f"n_blur sweep: {option(a, '--layer-sizes', '')}, "
                 f"{option(a, '--n-epochs', 30)} epochs, threshold {option(a, '--threshold', 2.0)}, "
                 f"seed {option(a, '--seed', 0)}, 10,000 training digits held out")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    for x, v, t in zip(n_blur, val, test):
        print(f"n_blur {x:2d}: val error {v:.2f}%  test error {t:.2f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
