"""Validation error against the goodness threshold, from sweep results (viz/threshold_sweep.png).

Reads the JSON-lines files written by experiments/sweeps/sweep.py, keeps the seed-0 runs
that differ from the small-budget baseline (784-500x4, mean goodness, n_blur 6, batch 100,
lr 0.03) in the threshold alone, and plots their validation error per epoch budget, with
the test error beside it, faint. Also prints every run as a markdown table ranked by
validation error. Runs without a validation split (older sweeps) are listed, unranked.
Records that hold no such sweep (another list's), or whose runs of one budget differ in
more than the threshold, are refused in one line before anything is printed or drawn.

    python3 -m experiments.sweeps.plot_threshold_sweep \\
        experiments/results/sweep-val-threshold.jsonl
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.records import (OneLineParser, RecordsError, check_figure,  # noqa: E402
                                 finished, main_of, one_experiment, option, pairs,
                                 read_records)

SWEEP_FLAGS = ("--layer-sizes", "--softmax-lr", "--softmax-epochs", "--n-epochs", "--threshold",
               "--val-size", "--head")  # what a line of sweep_val_threshold.txt may set
EXPECTS = ("plot_threshold_sweep.py expects two or more finished runs of 784-500x4 with a "
           "validation split, of one --n-epochs, that differ in --threshold alone, as "
           "experiments/sweeps/lists/sweep_val_threshold.txt makes them "
           "(experiments/results/sweep-val-threshold.jsonl)")
FINISHED = {"metrics": {"ff_seconds": float, "test_error": float, "val_error?": (float, None),
                        "real_vs_hybrid_accuracy?": ([float], None)},
            "refit_val_error?": (float, None), "refit_test_error?": (float, None)}


def val_error(r):
    return r["metrics"].get("val_error")


def percent(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def markdown_table(records):
    """Ranked by validation error (top 3 layers); test error only beside it."""
    lines = ["| label | options besides the small budget's | FF s | real-vs-hybrid L1-L4 | "
             "val error top 3 | top 4 | test error top 3 | top 4 |",
             "|---|---|---|---|---|---|---|---|"]
    common = pairs("--layer-sizes 784,500,500,500,500 --softmax-lr 2 --softmax-epochs 30 "
                   "--val-size 10000".split())
    ranked = sorted(records, key=lambda r: (val_error(r) is None, val_error(r) or 0))
    for r in ranked:
        changed = " ".join(f if v is None else f"{f} {v}"
                           for f, v in pairs(r["args"]) if (f, v) not in common)
        m = r["metrics"]
        acc = " / ".join(f"{100 * a:.1f}" for a in m.get("real_vs_hybrid_accuracy") or [])
        lines.append(f"| {r['label']} | `{changed}` | {m['ff_seconds']:.0f} | {acc} | "
                     f"{percent(val_error(r))} | {percent(r.get('refit_val_error'))} | "
                     f"{percent(m['test_error'])} | {percent(r.get('refit_test_error'))} |")
    return "\n".join(lines)


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default="viz/threshold_sweep.png")
    args = p.parse_args(argv)
    return main_of(lambda: plot(args))


def sweep_runs(records):
    """The runs of the threshold sweep: 784-500x4 with a validation split, no flag but the
    sweep's own."""
    return [r for r in records if val_error(r) is not None
            and option(r, "--layer-sizes", "") == "784,500,500,500,500"
            and all(f in SWEEP_FLAGS for f, _ in pairs(r["args"]))]


def threshold_series(runs):
    """{epochs: [(threshold, val %, test %)]} of the budgets with two thresholds or more;
    runs of a budget that differ in more than --threshold, or share one, are refused (the
    line would mix experiments), and so are records that hold no such budget."""
    series = {}
    for r in runs:
        if option(r, "--n-epochs", 30) > 0:
            series.setdefault(option(r, "--n-epochs", 30), []).append(r)
    for rs in series.values():
        one_experiment(rs, "--threshold", 2.0, EXPECTS)
    series = {epochs: sorted((option(r, "--threshold", 2.0), 100 * val_error(r),
                              100 * r["metrics"]["test_error"]) for r in rs)
              for epochs, rs in series.items() if len(rs) >= 2}
    if not series:
        raise RecordsError(f"not the records of a threshold sweep: {EXPECTS}")
    return series


def plot(args):
    check_figure(args.out)
    records = finished(read_records(args.results, FINISHED))
    if not records:
        raise RecordsError("no finished run in the results: nothing to plot")
    runs = sweep_runs(records)
    series = threshold_series(runs)  # before the table: other sweeps' records print nothing
    print(markdown_table(records))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    untrained = [r for r in runs if option(r, "--n-epochs", 30) == 0]
    for r in untrained:
        ax.axhline(100 * val_error(r), color="grey", lw=1, ls="-.",
                   label=f"untrained network, same head: {100 * val_error(r):.2f}% validation")
    for epochs in sorted(series):
        pts = series[epochs]
        th = [t for t, _, _ in pts]
        line, = ax.plot(th, [v for _, v, _ in pts], "o-",
                        label=f"{epochs} epochs: validation error (chooses)")
        ax.plot(th, [e for _, _, e in pts], "s--", color=line.get_color(), alpha=0.4,
                label=f"{epochs} epochs: test error (reported only)")
        for t, v, _ in pts:
            ax.annotate(f"{v:.2f}", (t, v), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize=8)
    plotted = [r for r in runs if option(r, "--n-epochs", 30) in series]
    seeds = ", ".join(sorted({str(option(r, "--seed", 0)) for r in plotted}))
    held_out = ", ".join(sorted({f"{option(r, '--val-size', 0):,}" for r in plotted}))
    ax.axvline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="goodness threshold theta (mean of h^2); reference: 2",
           ylabel="error (%), head on the top 3 layers",
           title=f"784-500x4, seed{'s' if ',' in seeds else ''} {seeds}, {held_out} training "
                 "digits held out "
                 "for validation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
