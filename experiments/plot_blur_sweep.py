"""Test error against n_blur from the sweep's saved runs (viz/blur_sweep.png).

    for n in 2 4 6 8 10; do
      python3 ff_hybrid_mnist.py --layer-sizes 784,500,500,500,500 --n-epochs 10 \
          --n-blur $n --out runs/blur-$n
    done
    python3 experiments/plot_blur_sweep.py runs/blur-2 runs/blur-4 runs/blur-6 runs/blur-8 runs/blur-10
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ff_hybrid_mnist as ff  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="viz/blur_sweep.png")
    args = p.parse_args(argv)
    rows = sorted((ff.load_run(d) for d in args.runs), key=lambda r: r.cfg.n_blur)
    n_blur = [r.cfg.n_blur for r in rows]
    test = [100 * r.metrics["test_error"] for r in rows]
    acc = [[100 * a for a in r.metrics["real_vs_hybrid_accuracy"]] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(n_blur, test, "o-")
    for x, y in zip(n_blur, test):
        ax1.annotate(f"{y:.2f}%", (x, y), textcoords="offset points", xytext=(0, 6), ha="center")
    ax1.set(xlabel="n_blur (passes of the [1/4, 1/2, 1/4] kernel)", ylabel="test error (%)",
            title="linear softmax on the top 3 layers", xticks=n_blur)
    for l in range(len(acc[0])):
        ax2.plot(n_blur, [a[l] for a in acc], "o-", label=f"layer {l + 1}")
    ax2.set(xlabel="n_blur", ylabel="real-vs-hybrid accuracy, last epoch (%)",
            title="how hard the negatives are", xticks=n_blur)
    ax2.legend()
    r = rows[0]
    fig.suptitle(f"n_blur sweep: {'-'.join(map(str, r.cfg.layer_sizes))}, "
                 f"{r.cfg.n_epochs} epochs, seed {r.args['seed']}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    for x, y in zip(n_blur, test):
        print(f"n_blur {x:2d}: test error {y:.2f}%")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
