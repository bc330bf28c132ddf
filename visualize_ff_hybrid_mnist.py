"""Figures of a Forward-Forward run, drawn from a saved run folder of any experiment script.

    python3 visualize_ff_hybrid_mnist.py --run runs/spec-seed0 --outdir viz
    python3 visualize_ff_hybrid_mnist.py --n-epochs 2 --n-train 5000 --outdir viz  # train, then draw

Writes hybrid_examples.png, goodness_distributions.png, classifier_curves.png,
weights_layer1.png and figure_numbers.json (the numbers the README quotes) into --outdir.
A run of ff_label_mnist.py gets label_goodness.png and confusion_matrix.png instead of
hybrid_examples.png; a run of ff_local_mnist.py has its layer-1 blocks drawn as 28 x 28 images.
Without --run it first trains a whole run with ff_hybrid_mnist.py's flags (by default the full
SPEC run, 30 epochs on 60000 digits), saved by ff_runs.run_experiment into --out (default
runs/<timestamp>-<hex>), and draws from that saved run. Without --outdir the figures go into
<run folder>/figures: the committed figures in viz/ change only when asked. Nothing here
re-derives the model: activities, goodness, masks and hybrids come from ff_hybrid_mnist (the
label read-out from ff_label_mnist); the figure helpers below (the GIF script uses them too)
only count and draw.
"""

import argparse
import json
import os
import sys

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

import ff_devices
import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
import ff_local_mnist as ff_local
import ff_recurrent_mnist as ff_recurrent
import ff_runs

PAPER_TEST_ERROR = 0.0137  # Hinton 2022, section 3.2: 4x2000 ReLU MLP with hybrid negatives


# -----------------------------------------------------------------------------
# Figure helpers (the GIF script uses them too): fixed digits, goodness, separation

def evaluation_set(x_test, n, rng, n_blur):
    """n real test digits and n hybrids of test digits, the pairs drawn as in training."""
    real = x_test[rng.choice(len(x_test), n, replace=n > len(x_test))]
    a, b = x_test[rng.choice(len(x_test), n)], x_test[rng.choice(len(x_test), n)]
    hybrids, _ = ff.make_hybrid_batch(a, b, rng, n_blur)
    return real, hybrids


def layer_goodness(weights, biases, x, kind, norm="l2", kinds=None):
    """Goodness of every layer for raw input rows x: a list of (n,) numpy arrays. kinds: the
    layers' kinds (cfg.layer_kinds())."""
    return [ff_devices.to_host(ff.goodness(h, kind))
            for h in ff.network_activities(weights, biases, x, norm=norm, kinds=kinds)]


def separation(g_real, g_hybrid):
    """Difference of the means over the pooled standard deviation (equal group sizes)."""
    g_real, g_hybrid = np.asarray(g_real, np.float64), np.asarray(g_hybrid, np.float64)
    pooled = np.sqrt((g_real.var() + g_hybrid.var()) / 2)
    return (g_real.mean() - g_hybrid.mean()) / pooled


def goodness_bins(threshold, n_bins=50):
    """Log-spaced bins two decades either side of the threshold. Goodness spans orders of
    magnitude and shifts during training; fixed bins keep GIF frames comparable."""
    return np.geomspace(threshold / 100, threshold * 100, n_bins + 1)


REAL_COLOUR, HYBRID_COLOUR = "tab:blue", "tab:orange"


def draw_goodness_histogram(ax, g_real, g_hybrid, threshold, bins):
    """Real and hybrid goodness on a matplotlib axis, log scale, threshold marked."""
    # values beyond the bins (a dead layer gives g = 0) are counted in the end bins; one
    # filled outline a histogram (stairs), not a bar a bin: the same picture, drawn in
    # about half the time
    for g, colour, label in ((g_real, REAL_COLOUR, "real"), (g_hybrid, HYBRID_COLOUR, "hybrid")):
        counts, _ = np.histogram(np.clip(g, bins[0], bins[-1]), bins)
        ax.stairs(counts, bins, fill=True, color=colour, alpha=0.55, label=label)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    ax.set_xscale("log")
    ax.set_xlabel("goodness (log; ends hold the outliers)")



# -----------------------------------------------------------------------------
# Command line: the training CLI's flags plus this script's own

def own_flags():
    own = argparse.ArgumentParser(add_help=False)
    group = own.add_argument_group(
        "figures", "--seed also seeds the digits and masks drawn. WITHOUT --run THIS TRAINS A "
        "WHOLE RUN FIRST with the training flags below (default: the full SPEC run), saved "
        "in --out (default runs/<timestamp>-<hex>)")
    group.add_argument("--run", metavar="DIR",
                       help="saved run to draw; without it, train one with the flags above")
    group.add_argument("--outdir", help="folder for the figures (default: <run folder>/figures)")
    group.add_argument("--n-eval", type=ff_runs.number_arg(int, 2), default=1000,
                       help="real test digits and as many hybrids for the goodness histograms")
    return own


# -----------------------------------------------------------------------------
# The four figures

def save_png(fig, path):
    """Render with Agg into a temporary file beside path, then rename (ff_runs.atomic_write)."""
    FigureCanvasAgg(fig)
    try:
        ff_runs.atomic_write(path, lambda f: fig.savefig(f, format="png"))
    except OSError as e:
        raise ff_runs.DataError(f"could not write {path} ({e.strerror or e})") from None
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
        threshold = run.cfg.layer_threshold(run.cfg.layer_sizes[l + 1])
        draw_goodness_histogram(ax, g_real[l], g_hybrid[l], threshold, goodness_bins(threshold))
        ax.set_title(f"layer {l + 1}: separation {separation(g_real[l], g_hybrid[l]):.1f} sigma")
    axes[0].set_ylabel("test images")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Goodness ({run.cfg.goodness} of h^2) of {len(g_real[0])} real test digits "
                 f"and {len(g_hybrid[0])} hybrids of test digits")
    fig.tight_layout()
    return fig


def converged_head_curves(ax, hist, metrics):
    """The converged head's fits one after another: training and choice-set error per L-BFGS
    iteration, each fit's penalty written where it starts, the chosen head's test error as
    one point where its fit ends (the test set is read once, by the finished head)."""
    start = chosen_end = 0
    for fit in hist["fits"]:
        its = start + np.arange(1, len(fit["train_error"]) + 1)
        first = start == 0
        ax.plot(its, 100 * np.array(fit["train_error"]), color="C0",
                label="train" if first else None)
        if fit.get("val_error"):
            ax.plot(its, 100 * np.array(fit["val_error"]), color="C1",
                    label=f"{hist['chosen_on']}" if first else None)
        ax.axvline(start, color="0.8", linewidth=0.8)
        ax.text(start, 1.0, f" C {fit['C']:g}", transform=ax.get_xaxis_transform(),
                fontsize=7, va="top", color="0.4")
        start = its[-1] if len(its) else start
        if fit["C"] == hist["C"]:
            chosen_end = start  # the last fit of the chosen C ends here
    if metrics and metrics.get("test_error") is not None:
        ax.plot([chosen_end], [100 * metrics["test_error"]], "o", color="C2",
                label=f"test, chosen C {hist['C']:g}: "
                      f"{100 * metrics['test_error']:.2f}%")


def classifier_curves_figure(run):
    fig = Figure(figsize=(11, 4), dpi=100)
    ax_ff, ax_softmax = fig.subplots(1, 2)
    losses = run.ff_history["loss"]
    if not losses:
        ax_ff.text(0.5, 0.5, "no FF epochs in this run\n(--n-epochs 0: the untrained network)",
                   ha="center", va="center", transform=ax_ff.transAxes)
    for l in range(len(run.weights)):
        # None: a layer not yet trained (greedy schedule); NaN (a frozen layer) breaks the line
        points = [(e + 1, row[l]) for e, row in enumerate(losses) if row[l] is not None]
        if points:
            ax_ff.plot(*zip(*points), marker=".", label=f"layer {l + 1}")
    ax_ff.set(xlabel="FF epoch", ylabel="FF loss (mean over the epoch's batches)",
              title="Forward-Forward loss per layer")
    ax_ff.xaxis.set_major_locator(MaxNLocator(integer=True))
    if losses:
        ax_ff.legend(fontsize=8)

    hist = run.softmax_history
    xlabel = "softmax epoch"
    if hist is None and isinstance(run.cfg, ff_recurrent.RecurrentConfig):
        # no head: each layer's right-vs-wrong-label accuracy per epoch
        for l in range(len(run.weights)):
            points = [(e + 1, 100 * (1 - row[l])) for e, row in
                      enumerate(run.ff_history["accuracy"]) if row[l] is not None]
            if points:
                ax_softmax.plot(*zip(*points), marker=".", label=f"layer {l + 1}")
        error = run.metrics.get("goodness_test_error")
        ax_softmax.set_title(f"{run.cfg.ACCURACY_NAME} errors of the layers' goodness"
                             + (f"; read-out: {100 * error:.2f}% test error" if error else ""),
                             fontsize=9)
        ax_softmax.set(xlabel="FF epoch", ylabel="error (%) of goodness > threshold")
        ax_softmax.legend(fontsize=8)
        fig.tight_layout()
        return fig
    if hist is None:
        ax_softmax.text(0.5, 0.5, "no softmax head in this run\n(--softmax-epochs 0)",
                        ha="center", va="center", transform=ax_softmax.transAxes)
    elif hist.get("kind") == "lbfgs":
        converged_head_curves(ax_softmax, hist, run.metrics)
        xlabel = "L-BFGS iteration (fits from the strongest penalty, smallest C, up)"
    else:
        epochs = np.arange(1, len(hist["train_error"]) + 1)
        ax_softmax.plot(epochs, 100 * np.array(hist["train_error"]), marker=".",
                        label="train (running, during the epoch)")
        if hist.get("val_error"):
            ax_softmax.plot(epochs, 100 * np.array(hist["val_error"]), marker=".",
                            label="validation")
        if hist.get("test_error"):  # runs from before the test set was read once, at the end
            ax_softmax.plot(epochs, 100 * np.array(hist["test_error"]), marker=".", label="test")
        ax_softmax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if run.cfg.negatives == "hybrid":  # the paper's number for this read-out and negatives
        ax_softmax.axhline(100 * PAPER_TEST_ERROR, color="k", linestyle="--", linewidth=1,
                           label="paper, 4x2000 MLP: 1.37%")
    ax_softmax.set_ylim(bottom=0)
    ax_softmax.set(xlabel=xlabel, ylabel="error (%)",
                   title=f"Linear softmax on the top {run.cfg.top_k} layers")
    ax_softmax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def top_units_by_norm(W, k=16):
    """Indices of the k units (columns of W, shape (n_in, n_units)) with the largest
    weight norm, largest first."""
    norms = np.linalg.norm(W, axis=0)
    return np.argsort(-norms, kind="stable")[:k]


def first_layer_weights(run):
    """Layer 1's weights as a dense (784, n_units) matrix (a locally-connected layer's blocks
    are spread into it, 0 outside each unit's receptive field)."""
    W, kind = run.weights[0], run.cfg.layer_kinds()[0]
    if kind is None:  # a dense layer
        return W
    return ff_local.local_dense(W, kind.index, run.cfg.layer_sizes[0])


def weights_figure(W, k=16, label_pixels=False):
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
        if label_pixels:  # the one-hot label lives in the first 10 pixels of the top row
            ax.add_patch(Rectangle((-0.5, -0.5), ff.N_CLASSES, 1, fill=False, lw=0.8))
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    for ax in axes[len(units):]:
        ax.set_visible(False)
    fig.suptitle(f"Layer 1: the {len(units)} units with the largest weight norm\n"
                 "(red positive, blue negative, each image scaled to its own max |w|"
                 + ("; boxed: the 10 label pixels" if label_pixels else "") + ")", fontsize=10)
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# Label runs (ff_label_mnist.py): goodness per label, confusion matrix

def label_goodness_figure(scores, x, y, n_digits=8):
    """Each digit beside the goodness that each of the ten labels gives it."""
    fig = Figure(figsize=(2.0 * n_digits, 4.2), dpi=100)
    axes = fig.subplots(2, n_digits, gridspec_kw={"height_ratios": [1, 1.3]})
    for c in range(n_digits):
        axes[0, c].imshow(x[c].reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        axes[0, c].set_xticks([]), axes[0, c].set_yticks([])
        axes[0, c].set_title(f"label {y[c]}, predicted {scores[c].argmax()}", fontsize=8)
        colours = ["tab:green" if k == y[c] else "tab:grey" for k in range(ff.N_CLASSES)]
        axes[1, c].bar(range(ff.N_CLASSES), scores[c], color=colours)
        axes[1, c].set_xticks(range(ff.N_CLASSES))
        axes[1, c].tick_params(labelsize=7)
    axes[1, 0].set_ylabel("goodness, summed")
    fig.suptitle("Supervised FF: each test digit run once with each label; the prediction is "
                 "the label with the most goodness (green: the true label)", fontsize=10)
    fig.tight_layout()
    return fig


def confusion_figure(y_true, y_pred):
    counts = np.zeros((ff.N_CLASSES, ff.N_CLASSES), int)
    np.add.at(counts, (y_true, y_pred), 1)
    fig = Figure(figsize=(5.6, 5), dpi=100)
    ax = fig.subplots()
    off = counts * (1 - np.eye(ff.N_CLASSES, dtype=int))  # the diagonal would swamp the colours
    ax.imshow(off, cmap="Reds")
    for i in range(ff.N_CLASSES):
        for j in range(ff.N_CLASSES):
            ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7,
                    color="k" if i != j else "tab:green")
    ax.set(xticks=range(ff.N_CLASSES), yticks=range(ff.N_CLASSES), xlabel="predicted label",
           ylabel="true label",
           title=f"Goodness read-out on {len(y_true)} test digits: "
                 f"{100 * np.mean(y_true != y_pred):.2f}% wrong")
    fig.tight_layout()
    return fig


def draw_label_run(run, x_test, y_test, rng, n_eval, outdir):
    """The label run's figures; returns its numbers for figure_numbers.json."""
    cfg = run.cfg
    scores = ff_label.goodness_per_label(run.weights, run.biases, x_test, cfg.goodness,
                                         cfg.first_readout_layer, norm=cfg.normalize,
                                         kinds=cfg.layer_kinds())
    predicted = scores.argmax(axis=1)
    pick = rng.choice(len(x_test), 8, replace=False)
    save_png(label_goodness_figure(scores[pick], x_test[pick], y_test[pick]),
             os.path.join(outdir, "label_goodness.png"))
    save_png(confusion_figure(y_test, predicted), os.path.join(outdir, "confusion_matrix.png"))
    # goodness histograms: the right label against a wrong one drawn uniformly
    digits = rng.choice(len(x_test), n_eval, replace=n_eval > len(x_test))
    wrong = (y_test[digits] + rng.integers(1, ff.N_CLASSES, n_eval)) % ff.N_CLASSES
    g_right = layer_goodness(run.weights, run.biases, ff_label.embed_labels(
        x_test[digits], y_test[digits]), cfg.goodness, cfg.normalize, cfg.layer_kinds())
    g_wrong = layer_goodness(run.weights, run.biases, ff_label.embed_labels(
        x_test[digits], wrong), cfg.goodness, cfg.normalize, cfg.layer_kinds())
    fig = goodness_figure(run, g_right, g_wrong)
    for ax in fig.axes:
        if ax.get_legend() is not None:
            handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles, ["right label", "wrong label", "threshold"], fontsize=8)
    fig.suptitle(f"Goodness of {n_eval} test digits with their right label and with a wrong one")
    save_png(fig, os.path.join(outdir, "goodness_distributions.png"))
    return {"goodness_test_error": float(np.mean(predicted != y_test)),
            "separation_sigma": [float(separation(r, w)) for r, w in zip(g_right, g_wrong)]}


# -----------------------------------------------------------------------------
# Recurrent runs (ff_recurrent_mnist.py): inference as an attractor

def goodness_by_iteration(run, digits):
    """(n, 10, T): each digit run with each label clamped, the goodness of the hidden layers
    (summed) at every iteration 1..T of the training dynamics (T = --n-iterations)."""
    cfg, n = run.cfg, len(digits)
    batch = np.empty((n * ff.N_CLASSES, cfg.batch_width), np.float32)
    batch[:, :cfg.layer_sizes[0]] = np.repeat(digits, ff.N_CLASSES, axis=0)
    ff_recurrent.one_hot(np.tile(np.arange(ff.N_CLASSES), n), out=batch[:, cfg.layer_sizes[0]:])
    work = ff_recurrent.RecurrentWork.allocate(cfg.layer_sizes, len(batch), 2)
    g = np.zeros((len(batch), cfg.n_iterations))
    for t, l in ff_recurrent.run_dynamics(run.weights, run.biases, batch, cfg, work,
                                          cfg.n_iterations):
        g[:, t - 1] += ff.goodness(work.h[l], cfg.goodness)
    return g.reshape(n, ff.N_CLASSES, cfg.n_iterations)


def attractor_figure(g, x, y, cfg):
    """Each digit above the goodness of each candidate label over the iterations; the
    read-out's window (iterations readout_first..readout_last) shaded."""
    n_digits, T = len(g), g.shape[2]
    fig = Figure(figsize=(2.3 * n_digits, 4.6), dpi=100)
    axes = fig.subplots(2, n_digits, gridspec_kw={"height_ratios": [1, 1.4]})
    iterations = np.arange(1, T + 1)
    for c in range(n_digits):
        predicted = g[c, :, cfg.readout_first - 1:cfg.readout_last].sum(axis=1).argmax()
        axes[0, c].imshow(x[c].reshape(28, 28), cmap="gray", vmin=0, vmax=1)
        axes[0, c].set_xticks([]), axes[0, c].set_yticks([])
        axes[0, c].set_title(f"label {y[c]}, predicted {predicted}", fontsize=8)
        ax = axes[1, c]
        ax.axvspan(cfg.readout_first - 0.5, cfg.readout_last + 0.5, color="0.92")
        for k in range(ff.N_CLASSES):
            right = k == y[c]
            ax.plot(iterations, g[c, k], color="tab:green" if right else "0.55",
                    lw=2 if right else 0.8, zorder=3 if right else 2)
        ax.set_xticks(iterations)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("iteration", fontsize=8)
    axes[1, 0].set_ylabel("goodness, hidden layers summed", fontsize=8)
    fig.suptitle("Recurrent FF: each test digit run with each of the ten labels clamped at the "
                 "top (green: the true label; grey: the nine others; shaded: the read-out's "
                 f"iterations {cfg.readout_first}-{cfg.readout_last})", fontsize=10)
    fig.tight_layout()
    return fig


def draw_recurrent_run(run, x_test, y_test, rng, n_eval, outdir):
    """The recurrent run's figures; returns its numbers for figure_numbers.json."""
    cfg = run.cfg
    pick = rng.choice(len(x_test), 6, replace=False)
    g = goodness_by_iteration(run, x_test[pick])
    save_png(attractor_figure(g, x_test[pick], y_test[pick], cfg),
             os.path.join(outdir, "attractor.png"))
    digits = rng.choice(len(x_test), min(n_eval, len(x_test)), replace=False)
    scores = ff_recurrent.goodness_per_label(run.weights, run.biases, x_test[digits], cfg)
    predicted = scores.argmax(axis=1)
    save_png(confusion_figure(y_test[digits], predicted),
             os.path.join(outdir, "confusion_matrix.png"))
    save_png(weights_figure(run.weights[0][:cfg.layer_sizes[0]]),
             os.path.join(outdir, "weights_layer1.png"))
    save_png(classifier_curves_figure(run), os.path.join(outdir, "classifier_curves.png"))
    right = g[np.arange(len(pick)), y_test[pick]]
    return {"goodness_error_on_drawn_digits": float(np.mean(predicted != y_test[digits])),
            "n_drawn_digits": int(len(digits)),
            "attractor_digits": [int(i) for i in pick],
            "right_label_goodness_by_iteration": right.round(4).tolist(),
            "goodness_test_error": run.metrics.get("goodness_test_error")}


# -----------------------------------------------------------------------------
# Main: train if asked, then draw everything from the saved run

def draw(run, x_test, y_test, rng, n_eval, outdir):
    """Write the four figures and figure_numbers.json; returns the numbers. A label run
    gets the goodness per label, the confusion matrix, right- against wrong-label goodness,
    the curves and the layer-1 weights (its label pixels boxed)."""
    os.makedirs(outdir, exist_ok=True)
    if isinstance(run.cfg, ff_recurrent.RecurrentConfig):
        numbers = {"run": run.run_dir, "n_eval": n_eval,
                   **draw_recurrent_run(run, x_test, y_test, rng, n_eval, outdir)}
        ff_runs.write_json(os.path.join(outdir, "figure_numbers.json"), numbers)
        print(f"goodness read-out on {numbers['n_drawn_digits']} test digits: error "
              f"{100 * numbers['goodness_error_on_drawn_digits']:.2f}%")
        return numbers
    if isinstance(run.cfg, ff_label.LabelConfig):
        numbers = {"run": run.run_dir, "n_eval": n_eval,
                   **draw_label_run(run, x_test, y_test, rng, n_eval, outdir),
                   "test_error": run.metrics.get("test_error")}
        save_png(classifier_curves_figure(run), os.path.join(outdir, "classifier_curves.png"))
        save_png(weights_figure(first_layer_weights(run), label_pixels=True),
                 os.path.join(outdir, "weights_layer1.png"))
        ff_runs.write_json(os.path.join(outdir, "figure_numbers.json"), numbers)
        print(f"goodness read-out: test error {100 * numbers['goodness_test_error']:.2f}%")
        return numbers
    save_png(hybrid_examples_figure(x_test, y_test, rng, run.cfg.n_blur),
             os.path.join(outdir, "hybrid_examples.png"))
    real, hybrids = evaluation_set(x_test, n_eval, rng, run.cfg.n_blur)
    cfg = run.cfg
    g_real = layer_goodness(run.weights, run.biases, real, cfg.goodness, cfg.normalize,
                            cfg.layer_kinds())
    g_hybrid = layer_goodness(run.weights, run.biases, hybrids, cfg.goodness, cfg.normalize,
                              cfg.layer_kinds())
    save_png(goodness_figure(run, g_real, g_hybrid),
             os.path.join(outdir, "goodness_distributions.png"))
    save_png(classifier_curves_figure(run), os.path.join(outdir, "classifier_curves.png"))
    save_png(weights_figure(first_layer_weights(run)),
             os.path.join(outdir, "weights_layer1.png"))

    numbers = {"run": run.run_dir, "n_eval": n_eval,
               "separation_sigma": [float(separation(r, h)) for r, h in zip(g_real, g_hybrid)],
               "mean_goodness_real": [float(g.mean()) for g in g_real],
               "mean_goodness_hybrid": [float(g.mean()) for g in g_hybrid],
               "test_error": run.metrics.get("test_error")}
    ff_runs.write_json(os.path.join(outdir, "figure_numbers.json"), numbers)
    print("separation real vs hybrid: " + "  ".join(
        f"L{l + 1} {s:.1f} sigma" for l, s in enumerate(numbers["separation_sigma"])))
    error = numbers["test_error"]
    print("final test error: " + (f"{100 * error:.2f}%" if error is not None else
                                  "no softmax head" if run.head is None else
                                  "not in metrics.json"))
    return numbers


def build_parser():
    # a run it trains itself is ff_hybrid_mnist.py's; a saved run of any script is drawn
    return ff_runs.build_parser(ff.FFConfig, description=__doc__.split("\n\n")[0],
                                parents=[own_flags()])


def main(argv=None):
    parser = build_parser()

    def body():
        args = parser.parse_args(argv)
        if args.n_eval > ff.N_TEST:
            raise ff_runs.SettingsError(f"--n-eval {args.n_eval} exceeds the {ff.N_TEST} "
                                        "test digits")
        if args.outdir:
            ff_runs.check_writable(args.outdir, "--outdir")
        if args.run:
            ignored = ((ff_runs.flags_given(args) - {"seed"})
                       | {name for name in ("out", "resume") if getattr(args, name)})
            if ignored:
                raise ff_runs.SettingsError("--run draws a saved run; drop the training flags "
                                            + ", ".join(ff_runs.flag(k) for k in sorted(ignored)))
            seed = 0 if args.seed is None else args.seed
            run = ff_runs.load_run(args.run)  # a damaged run is refused before anything is drawn
            args.outdir = args.outdir or os.path.join(args.run, "figures")
            if args.dry_run:
                print(json.dumps({"run": args.run, "config": ff_runs.config_record(run.cfg),
                                  "outdir": args.outdir, "n_eval": args.n_eval}, indent=1))
                return 0
        else:
            ff_runs.prepare_run(args, parser)
            seed = args.config.seed
            args.outdir = args.outdir or os.path.join(args.run_dir, "figures")
            ff_runs.check_writable(args.outdir, "--outdir")
            if args.dry_run:
                ff_runs.print_dry_run(args, outdir=args.outdir, n_eval=args.n_eval)
                return 0
            run = ff_runs.load_run(ff_runs.run_experiment(args).run_dir)
        _, _, x_test, y_test = ff.load_mnist(args.data_dir)
        # a stream of its own, apart from training's (seed) and the softmax head's ([seed, 1])
        draw(run, x_test, y_test, np.random.default_rng([seed, 2]), args.n_eval,
             args.outdir)
        return 0
    return ff_runs.exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
