"""Test error against the goodness threshold, from sweep results (viz/threshold_sweep.png).

Reads the JSON-lines files written by experiments/sweep.py, keeps the seed-0 runs that
differ from the small-budget baseline (784-500x4, mean goodness, n_blur 6, batch 100,
lr 0.03) in the threshold alone, and plots their test error per epoch budget. Also prints
every run of the files as a markdown table.

    python3 experiments/plot_threshold_sweep.py experiments/results/sweep-small*.jsonl
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def option(args, name, default):
    return type(default)(args[args.index(name) + 1]) if name in args else default


def read(paths):
    records = []
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            if r["rc"] == 0:
                records.append(r)
    return records


def pairs(args):
    """CLI arguments as (flag, value) pairs; value None for a switch."""
    out, i = [], 0
    while i < len(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        out.append((args[i], args[i + 1] if has_value else None))
        i += 2 if has_value else 1
    return out


def markdown_table(records):
    lines = ["| label | options besides the small budget's | FF s | real-vs-hybrid L1-L4 | "
             "test error top 3 | top 4 |", "|---|---|---|---|---|---|"]
    common = pairs("--layer-sizes 784,500,500,500,500 --softmax-lr 2 --softmax-epochs 30".split())
    for r in records:
        changed = " ".join(f if v is None else f"{f} {v}"
                           for f, v in pairs(r["args"]) if (f, v) not in common)
        m = r["metrics"]
        acc = " / ".join(f"{100 * a:.1f}" for a in m["real_vs_hybrid_accuracy"])
        top4 = f"{100 * r['refit_test_error']:.2f}%" if "refit_test_error" in r else "-"
        lines.append(f"| {r['label']} | `{changed}` | {m['ff_seconds']:.0f} | {acc} | "
                     f"{100 * m['test_error']:.2f}% | {top4} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default="viz/threshold_sweep.png")
    args = p.parse_args(argv)
    records = read(args.results)
    print(markdown_table(records))
    series = {}
    for r in records:
        a = r["args"]
        other = [x for x in a if x.startswith("--") and x not in
                 ("--layer-sizes", "--softmax-lr", "--softmax-epochs", "--n-epochs", "--threshold")]
        if other or option(a, "--layer-sizes", "") != "784,500,500,500,500":
            continue
        epochs = option(a, "--n-epochs", 30)
        series.setdefault(epochs, []).append(
            (option(a, "--threshold", 2.0), 100 * r["metrics"]["test_error"],
             100 * r.get("refit_test_error", float("nan"))))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for epochs in sorted(series):
        pts = sorted(series[epochs])
        if len(pts) < 2:
            continue
        th = [t for t, _, _ in pts]
        line, = ax.plot(th, [e for _, e, _ in pts], "o-", label=f"{epochs} epochs, top 3 layers")
        ax.plot(th, [e for _, _, e in pts], "s--", color=line.get_color(), alpha=0.6,
                label=f"{epochs} epochs, top 4 layers")
        for t, e, _ in pts:
            ax.annotate(f"{e:.2f}", (t, e), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=8)
    ax.axvline(2.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="goodness threshold theta (mean of h^2); SPEC: 2",
           ylabel="test error (%)", title="784-500x4, seed 0, head SGD lr 2 x 30 epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
