"""The figure scripts on a tiny run: every file is written, decodes and shows something."""

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest

import ff_hybrid_mnist as ff
import make_ff_hybrid_mnist_gif as gif
import visualize_ff_hybrid_mnist as viz
from conftest import TINY

PNGS = ("hybrid_examples.png", "goodness_distributions.png", "classifier_curves.png",
        "weights_layer1.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train a tiny run through the visualiser (no --run), which then draws from it."""
    root = tmp_path_factory.mktemp("figures")
    run_dir, outdir = str(root / "run"), str(root / "viz")
    assert viz.main(TINY + ["--n-epochs", "2", "--out", run_dir, "--outdir", outdir]) == 0
    return run_dir, outdir


def read_numbers(outdir):
    with open(os.path.join(outdir, "figure_numbers.json")) as f:
        return json.load(f)


def test_visualiser_writes_four_pngs_that_show_something(trained):
    _, outdir = trained
    for name in PNGS:
        image = iio.imread(os.path.join(outdir, name))
        assert image.shape[0] >= 200 and image.shape[1] >= 200, name
        assert image[..., :3].std() > 5, f"{name} is blank"
    assert not [f for f in os.listdir(outdir) if f.startswith(".tmp-")]


def test_figure_numbers_match_the_run(trained):
    run_dir, outdir = trained
    numbers = read_numbers(outdir)
    run = ff.load_run(run_dir)
    assert len(numbers["separation_sigma"]) == 3
    assert all(np.isfinite(numbers["separation_sigma"]))
    assert numbers["test_error"] == run.metrics["test_error"]


def test_drawing_a_saved_run_again_gives_the_same_numbers(trained, tmp_path):
    run_dir, outdir = trained
    assert viz.main(["--run", run_dir, "--outdir", str(tmp_path)]) == 0
    assert read_numbers(tmp_path) == read_numbers(outdir)
    assert all(os.path.isfile(tmp_path / name) for name in PNGS)


def test_run_with_training_flags_is_refused(trained, tmp_path):
    run_dir, _ = trained
    assert viz.main(["--run", run_dir, "--n-epochs", "5", "--outdir", str(tmp_path)]) == 2
    assert not os.listdir(tmp_path)


def test_separation_is_mean_gap_over_pooled_std():
    real, hybrid = np.array([3.0, 5.0]), np.array([0.0, 0.0])  # stds 1 and 0: pooled sqrt(1/2)
    assert ff.separation(real, hybrid) == pytest.approx(4.0 / np.sqrt(0.5))




def test_top_units_by_norm_picks_the_largest_columns_largest_first():
    rng = np.random.default_rng(0)
    n_units = 40
    column_norms = rng.permutation(np.arange(1.0, n_units + 1))
    W = np.zeros((784, n_units))
    # each column's weight sits on a row other than its own index, so row norms would
    # name different units; a second small entry keeps the norms from being the values
    W[3 * np.arange(n_units) + 5, np.arange(n_units)] = column_norms * 0.6
    W[3 * np.arange(n_units) + 6, np.arange(n_units)] = -column_norms * 0.8
    expected = np.argsort(column_norms)[::-1][:16]
    assert list(viz.top_units_by_norm(W)) == list(expected)
    assert viz.top_units_by_norm(W, k=1)[0] == int(np.argmax(column_norms))


def test_label_run_figures_show_the_goodness_read_out(tmp_path):
    run_dir, outdir = str(tmp_path / "run"), str(tmp_path / "viz")
    assert viz.main(TINY + ["--negatives", "label", "--n-epochs", "1", "--out", run_dir,
                            "--outdir", outdir, "--n-eval", "200"]) == 0
    for name in ("label_goodness.png", "confusion_matrix.png", "goodness_distributions.png",
                 "classifier_curves.png", "weights_layer1.png"):
        image = iio.imread(os.path.join(outdir, name))
        assert image[..., :3].std() > 5, f"{name} is blank"
    assert not os.path.exists(os.path.join(outdir, "hybrid_examples.png"))
    # the confusion matrix counts the same predictions as the run's own read-out
    numbers = read_numbers(outdir)
    assert numbers["goodness_test_error"] == ff.load_run(run_dir).metrics["goodness_test_error"]


def test_locally_connected_run_is_drawn(tmp_path):
    """The figures read a locally-connected run's blocks: layer 1's weights are drawn as
    28 x 28 images, 0 outside each unit's receptive field."""
    local = ["--local", "10:6:4,2:1:5", "--top-k", "2", "--n-train", "500", "--batch-size", "50",
             "--head", "sgd", "--softmax-epochs", "2", "--n-epochs", "1"]
    run_dir, outdir = str(tmp_path / "run"), str(tmp_path / "viz")
    assert viz.main(local + ["--out", run_dir, "--outdir", outdir, "--n-eval", "200"]) == 0
    for name in PNGS:
        assert iio.imread(os.path.join(outdir, name))[..., :3].std() > 5, f"{name} is blank"
    assert len(read_numbers(outdir)["separation_sigma"]) == 2
    W = viz.first_layer_weights(ff.load_run(run_dir))
    assert W.shape == (784, 64) and (W[ff.local_masks(ff.parse_local("10:6:4"))[0] == 0] == 0).all()
    path = tmp_path / "anim" / "training.gif"
    assert gif.main(local + ["--n-eval", "100", "--gif", str(path),
                             "--out", str(tmp_path / "anim" / "run")]) == 0
    assert iio.imread(path, index=None).shape[0] == 1


def test_converged_head_run_draws_its_fits(converged_run, tmp_path):
    run_dir, outdir = converged_run[0], str(tmp_path / "viz")
    assert viz.main(["--run", run_dir, "--outdir", outdir]) == 0
    run = ff.load_run(run_dir)
    assert run.softmax_history["kind"] == "lbfgs"
    fig = viz.classifier_curves_figure(run)
    ax = fig.axes[1]
    n_iterations = sum(len(f["train_error"]) for f in run.softmax_history["fits"])
    train_line = ax.get_lines()[0]
    assert len(train_line.get_xdata()) == len(run.softmax_history["fits"][0]["train_error"])
    assert max(l.get_xdata()[-1] for l in ax.get_lines() if len(l.get_xdata())) >= n_iterations
    assert "L-BFGS iteration" in ax.get_xlabel()
    image = iio.imread(os.path.join(outdir, "classifier_curves.png"))
    assert image[..., :3].std() > 5


def test_untrained_and_label_runs_draw_no_wrong_reference(tmp_path, recwarn):
    untrained = str(tmp_path / "untrained")
    assert ff.main(TINY + ["--n-epochs", "0", "--out", untrained]) == 0
    fig = viz.classifier_curves_figure(ff.load_run(untrained))
    fig.savefig(str(tmp_path / "u.png"))
    assert "no FF epochs" in " ".join(t.get_text() for t in fig.axes[0].texts)
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]
    label = str(tmp_path / "label")
    assert ff.main(TINY + ["--n-epochs", "1", "--negatives", "label", "--out", label]) == 0
    fig = viz.classifier_curves_figure(ff.load_run(label))
    assert not [l for l in fig.axes[1].get_lines() if "1.37" in str(l.get_label())]
