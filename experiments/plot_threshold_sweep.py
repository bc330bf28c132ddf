"""Validation error against the goodness threshold, from sweep results (viz/threshold_sweep.png).

Reads the JSON-lines files written by experiments/sweep.py, keeps the seed-0 runs that
differ from the small-budget baseline (784-500x4, mean goodness, n_blur 6, batch 100,
lr 0.03) in the threshold alone, and plots their validation error per epoch budget, with
the test error beside it, faint. Also prints every run as a markdown table ranked by
validation error. Runs without a validation split (older sweeps) are listed, unranked.

    python3 experiments/plot_threshold_sweep.py experiments/results/sweep-val-threshold.jsonl
"""

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from records import RecordsError, check_out, finished, main_of, read_records  # noqa: E402


def option(args, name, default):
    """The value of the flag's last occurrence, as argparse reads it."""
    if name not in args:
        return default
    return type(default)(args[len(args) - 1 - args[::-1].index(name) + 1])


def val_error(r):
    return r["metrics"].get("val_error")


def pairs(args):
    """CLI arguments as (flag, value) pairs, value None for a switch; a repeated flag
    (a sweep line overriding its base) keeps its last value."""
    out, i = {}, 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out.pop(args[i], None)
        out[args[i]] = args[i + 1] if has_value else None
        i += 2 if has_value else 1
    return list(out.items())


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
        acc = " / ".join(f"{100 * a:.1f}" for a in m["real_vs_hybrid_accuracy"] or [])
        lines.append(f"| {r['label']} | `{changed}` | {m['ff_seconds']:.0f} | {acc} | "
                     f"{percent(val_error(r))} | {percent(r.get('refit_val_error'))} | "
                     f"{percent(m['test_error'])} | {percent(r.get('refit_test_error'))} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default="viz/threshold_sweep.png")
    args = p.parse_args(argv)
    return main_of(lambda: plot(args))


def plot(args):
    check_out(args.out)
    records = finished(read_records(args.results))
    if not records:
        raise RecordsError("no finished run in the results: nothing to plot")
    print(markdown_table(records))
    series = {}
    for r in records:
        a = r["args"]
        other = [x for x in a if x.startswith("--") and x not in
                 ("--layer-sizes", "--softmax-lr", "--softmax-epochs", "--n-epochs",
                  "--threshold", "--val-size")]
        if other or option(a, "--layer-sizes", "") != "784,500,500,500,500" \
                or val_error(r) is None or option(a, "--n-epochs", 30) == 0:
            continue
        series.setdefault(option(a, "--n-epochs", 30), []).append(
            (option(a, "--threshold", 2.0), 100 * val_error(r), 100 * r["metrics"]["test_error"]))
    if not any(len(pts) >= 2 for pts in series.values()):
        raise RecordsError("no two runs of the same budget that differ in --threshold alone: "
                           "nothing to plot")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    untrained = [r for r in records if option(r["args"], "--n-epochs", 30) == 0
                 and val_error(r) is not None]
    for r in untrained:
        ax.axhline(100 * val_error(r), color="grey", lw=1, ls="-.",
                   label=f"untrained network, same head: {100 * val_error(r):.2f}% validation")
    for epochs in sorted(series):
        pts = sorted(series[epochs])
        if len(pts) < 2:
            continue
        th = [t for t, _, _ in pts]
        line, = ax.plot(th, [v for _, v, _ in pts], "o-",
                        label=f"{epochs} epochs: validation error (chooses)")
        ax.plot(th, [e for _, _, e in pts], "s--", color=line.get_color(), alpha=0.4,
                label=f"{epochs} epochs: test error (reported only)")
        for t, v, _ in pts:
            ax.annotate(f"{v:.2f}", (t, v), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize=8)
    plotted = [r for r in records if option(r["args"], "--n-epochs", 30) in series]
    seeds = ", ".join(sorted({str(option(r["args"], "--seed", 0)) for r in plotted}))
    held_out = ", ".join(sorted({f"{option(r['args'], '--val-size', 0):,}" for r in plotted}))
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
