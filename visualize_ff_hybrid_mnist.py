"""Figures of a Forward-Forward run with hybrid negatives, drawn from a saved run folder.

    python3 visualize_ff_hybrid_mnist.py --run runs/spec-seed0 --outdir viz
    python3 visualize_ff_hybrid_mnist.py --n-epochs 2 --n-train 5000 --outdir viz  # train, then draw

Writes hybrid_examples.png, goodness_distributions.png, classifier_curves.png,
weights_layer1.png and figure_numbers.json (the numbers the README quotes) into --outdir.
Without --run it takes the training CLI's flags, trains with ff_hybrid_mnist.run (which saves
the run, by default into <outdir>/run) and draws from that saved run. Nothing here re-derives
the model: activities, goodness, masks and hybrids all come from ff_hybrid_mnist.
"""

import argparse
import os
import sys

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import ff_hybrid_mnist as ff

PAPER_TEST_ERROR = 0.0137  # Hinton 2022, section 3.2: 4x2000 ReLU MLP with hybrid negatives
REAL_COLOUR, HYBRID_COLOUR = "tab:blue", "tab:orange"


# -----------------------------------------------------------------------------
# Command line: the training CLI's flags plus this script's own

def parse_args_with_training_flags(own, argv, description):
    """(training args, own args). One parser shows and checks every flag; the module's
    parse_args then applies its cross-flag checks (--top-k, --batch-size, ...) to the rest."""
    combined = argparse.ArgumentParser(
        description=description, parents=[ff.build_parser(), own], add_help=False,
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    combined.parse_args(argv)  # --help, unknown flags and bad values, in one place
    own_args, training_argv = own.parse_known_args(argv)
    return ff.parse_args(training_argv), own_args


def own_flags():
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = own.add_argument_group(
        "figures", "--seed also seeds the digits and masks drawn; a run trained here is "
        "saved in <outdir>/run unless --out or --resume says otherwise")
    group.add_argument("--run", metavar="DIR",
                       help="saved run to draw; without it, train one with the flags above")
    group.add_argument("--outdir", default="viz", help="folder for the figures")
    group.add_argument("--n-eval", type=ff.number_arg(int, 2), default=1000,
                       help="real test digits and as many hybrids for the goodness histograms")
    return own


# -----------------------------------------------------------------------------
# Evaluation digits and their goodness (shared with make_ff_hybrid_mnist_gif.py)

def evaluation_set(x_test, n, rng, n_blur):
    """n real test digits and n hybrids of test digits, the pairs drawn as in training."""
    real = x_test[rng.choice(len(x_test), n, replace=n > len(x_test))]
    a, b = x_test[rng.choice(len(x_test), n)], x_test[rng.choice(len(x_test), n)]
    hybrids, _ = ff.make_hybrid_batch(a, b, rng, n_blur)
    return real, hybrids


def layer_goodness(weights, biases, x, kind):
    """Goodness of every layer for raw input rows x: a list of (n,) arrays."""
    return [ff.goodness(h, kind) for h in ff.network_activities(weights, biases, x)]


def separation(g_real, g_hybrid):
    """Difference of the means over the pooled standard deviation (equal group sizes)."""
    g_real, g_hybrid = np.asarray(g_real, np.float64), np.asarray(g_hybrid, np.float64)
    pooled = np.sqrt((g_real.var() + g_hybrid.var()) / 2)
    return (g_real.mean() - g_hybrid.mean()) / pooled


def goodness_bins(threshold, n_bins=50):
    """Log-spaced bins two decades either side of the threshold. Goodness spans orders of
    magnitude and shifts during training; fixed bins keep GIF frames comparable."""
    return np.geomspace(threshold / 100, threshold * 100, n_bins + 1)


def draw_goodness_histogram(ax, g_real, g_hybrid, threshold, bins):
    # values beyond the bins (a dead layer gives g = 0) are counted in the end bins
    for g, colour, label in ((g_real, REAL_COLOUR, "real"), (g_hybrid, HYBRID_COLOUR, "hybrid")):
        ax.hist(np.clip(g, bins[0], bins[-1]), bins=bins, color=colour, alpha=0.55, label=label)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    ax.set_xscale("log")
    ax.set_xlabel("goodness (log; ends hold the outliers)")


# -----------------------------------------------------------------------------
# The four figures

def save_png(fig, path):
    """Render with Agg into a temporary file beside path, then rename (ff.atomic_write)."""
    FigureCanvasAgg(fig)
    ff.atomic_write(path, lambda f: fig.savefig(f, format="png"))
    print(f"wrote {path}", flush=True)


def hybrid_examples_figure(x_test, y_test, rng, n_blur, n_pairs=6):
    pick = rng.choice(len(x_test), 2 * n_pairs, replace=False)
    a, b = x_test[pick[:n_pairs]], x_test[pick[n_pairs:]]
    hybrids, masks = ff.make_hybrid_batch(a, b, rng, n_blur)
    fig = Figure(figsize=(1.5 * n_pairs, 6.4), dpi=100)
    axes = fig.subplots(4, n_pairs)
    rows = (("digit a", a), ("digit b", b), ("mask (1: a)", masks), ("hybrid", hybrids))
    for r, (name, images) in enumerate(rows):
        for c in range(n_pairs):
            ax = axes[r, c]
            ax.imshow(images[c].reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name)
    for c in range(n_pairs):
        axes[0, c].set_title(f"{y_test[pick[c]]} + {y_test[pick[n_pairs + c]]}")
    fig.suptitle(f"Hybrid negatives: mask from {n_blur} blur passes, hybrid = m*a + (1-m)*b")
    fig.tight_layout()
    return fig


def goodness_figure(run, g_real, g_hybrid):
    n_layers = len(g_real)
    fig = Figure(figsize=(3.6 * n_layers, 3.6), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, n_layers))
    for l, ax in enumerate(axes):
        threshold = run.cfg.layer_threshold(run.weights[l].shape[1])
        draw_goodness_histogram(ax, g_real[l], g_hybrid[l], threshold, goodness_bins(threshold))
        ax.set_title(f"layer {l + 1}: separation {separation(g_real[l], g_hybrid[l]):.1f} sigma")
    axes[0].set_ylabel("test images")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Goodness ({run.cfg.goodness} of h^2) of {len(g_real[0])} real test digits "
                 f"and {len(g_hybrid[0])} hybrids of test digits")
    fig.tight_layout()
    return fig


def classifier_curves_figure(run):
    fig = Figure(figsize=(11, 4), dpi=100)
    ax_ff, ax_softmax = fig.subplots(1, 2)
    losses = run.ff_history["loss"]
    for l in range(len(run.weights)):
        # None: a layer not yet trained (greedy schedule); NaN (a frozen layer) breaks the line
        points = [(e + 1, row[l]) for e, row in enumerate(losses) if row[l] is not None]
        if points:
            ax_ff.plot(*zip(*points), marker=".", label=f"layer {l + 1}")
    ax_ff.set(xlabel="FF epoch", ylabel="FF loss (mean over the epoch's batches)",
              title="Forward-Forward loss per layer")
    ax_ff.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ff.legend(fontsize=8)

    hist = run.softmax_history
    if hist is None:
        ax_softmax.text(0.5, 0.5, "no softmax head in this run\n(--softmax-epochs 0)",
                        ha="center", va="center", transform=ax_softmax.transAxes)
    else:
        epochs = np.arange(1, len(hist["test_error"]) + 1)
        ax_softmax.plot(epochs, 100 * np.array(hist["train_error"]), marker=".",
                        label="train (running, during the epoch)")
        ax_softmax.plot(epochs, 100 * np.array(hist["test_error"]), marker=".", label="test")
        ax_softmax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_softmax.axhline(100 * PAPER_TEST_ERROR, color="k", linestyle="--", linewidth=1,
                       label="paper, 4x2000 MLP: 1.37%")
    ax_softmax.set_ylim(bottom=0)
    ax_softmax.set(xlabel="softmax epoch", ylabel="error (%)",
                   title=f"Linear softmax on the top {run.top_k} layers")
    ax_softmax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def top_units_by_norm(W, k=16):
    """Indices of the k units (columns of W, shape (n_in, n_units)) with the largest
    weight norm, largest first."""
    norms = np.linalg.norm(W, axis=0)
    return np.argsort(-norms, kind="stable")[:k]


def weights_figure(W, k=16):
    units = top_units_by_norm(W, k)
    n_cols = int(np.ceil(np.sqrt(len(units))))
    n_rows = int(np.ceil(len(units) / n_cols))
    fig = Figure(figsize=(1.8 * n_cols, 1.9 * n_rows + 0.6), dpi=100)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols)).ravel()
    for ax, j in zip(axes, units):
        image = W[:, j].reshape(28, 28)
        scale = np.abs(image).max() or 1.0
        ax.imshow(image, cmap="bwr", vmin=-scale, vmax=scale)  # white is 0
        ax.set_title(f"unit {j}  |w| {np.linalg.norm(image):.1f}", fontsize=8)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes[len(units):]:
        ax.set_visible(False)
    fig.suptitle(f"Layer 1: the {len(units)} units with the largest weight norm\n"
                 "(red positive, blue negative, each image scaled to its own max |w|)",
                 fontsize=10)
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# Main: train if asked, then draw everything from the saved run

def draw(run, x_test, y_test, rng, n_eval, outdir):
    """Write the four figures and figure_numbers.json; returns the numbers."""
    os.makedirs(outdir, exist_ok=True)
    save_png(hybrid_examples_figure(x_test, y_test, rng, run.cfg.n_blur),
             os.path.join(outdir, "hybrid_examples.png"))
    real, hybrids = evaluation_set(x_test, n_eval, rng, run.cfg.n_blur)
    g_real = layer_goodness(run.weights, run.biases, real, run.cfg.goodness)
    g_hybrid = layer_goodness(run.weights, run.biases, hybrids, run.cfg.goodness)
    save_png(goodness_figure(run, g_real, g_hybrid),
             os.path.join(outdir, "goodness_distributions.png"))
    save_png(classifier_curves_figure(run), os.path.join(outdir, "classifier_curves.png"))
    save_png(weights_figure(run.weights[0]), os.path.join(outdir, "weights_layer1.png"))

    numbers = {"run": run.run_dir, "n_eval": n_eval,
               "separation_sigma": [float(separation(r, h)) for r, h in zip(g_real, g_hybrid)],
               "mean_goodness_real": [float(g.mean()) for g in g_real],
               "mean_goodness_hybrid": [float(g.mean()) for g in g_hybrid],
               "test_error": run.metrics.get("test_error")}
    ff.write_json(os.path.join(outdir, "figure_numbers.json"), numbers)
    print("separation real vs hybrid: " + "  ".join(
        f"L{l + 1} {s:.1f} sigma" for l, s in enumerate(numbers["separation_sigma"])))
    error = numbers["test_error"]
    print("final test error: " + ("no softmax head" if error is None else f"{100 * error:.2f}%"))
    return numbers


def main(argv=None):
    own = own_flags()
    args, fig_args = parse_args_with_training_flags(own, argv, __doc__.split("\n\n")[0])
    try:
        if fig_args.run:
            defaults = vars(ff.parse_args([]))
            ignored = [k for k, v in vars(args).items()
                       if k not in ("seed", "data_dir") and v != defaults.get(k)]
            if ignored:
                print("error: --run draws a saved run; drop the training flags "
                      + ", ".join("--" + k.replace("_", "-") for k in ignored), file=sys.stderr)
                return 2
            run_dir = fig_args.run
        else:
            if not args.resume and not args.out:
                args.out = os.path.join(fig_args.outdir, "run")
            run_dir = args.resume or args.out
            ff.run(args)
        run = ff.load_run(run_dir)
        _, _, x_test, y_test = ff.load_mnist(args.data_dir)
    except (ff.DataError, ff.TrainingDiverged, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # a stream of its own, apart from training's (seed) and the softmax head's ([seed, 1])
    draw(run, x_test, y_test, np.random.default_rng([args.seed, 2]), fig_args.n_eval,
         fig_args.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
