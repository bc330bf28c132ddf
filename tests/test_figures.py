"""The figure scripts on a tiny run: every file is written, decodes and shows something."""

import json
import os
import types

import imageio.v3 as iio
import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
import ff_local_mnist as ff_local
import ff_recurrent_mnist as ff_recurrent
import ff_runs
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
    run = ff_runs.load_run(run_dir)
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
    assert viz.separation(real, hybrid) == pytest.approx(4.0 / np.sqrt(0.5))




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
    """A saved run of ff_label_mnist.py is drawn with its own figures."""
    run_dir, outdir = str(tmp_path / "run"), str(tmp_path / "viz")
    assert ff_label.main(TINY + ["--n-epochs", "1", "--out", run_dir]) == 0
    assert viz.main(["--run", run_dir, "--outdir", outdir, "--n-eval", "200"]) == 0
    for name in ("label_goodness.png", "confusion_matrix.png", "goodness_distributions.png",
                 "classifier_curves.png", "weights_layer1.png"):
        image = iio.imread(os.path.join(outdir, name))
        assert image[..., :3].std() > 5, f"{name} is blank"
    assert not os.path.exists(os.path.join(outdir, "hybrid_examples.png"))
    # the confusion matrix counts the same predictions as the run's own read-out
    numbers = read_numbers(outdir)
    run = ff_runs.load_run(run_dir)
    assert isinstance(run.cfg, ff_label.LabelConfig)
    assert numbers["goodness_test_error"] == run.metrics["goodness_test_error"]


def test_recurrent_run_is_drawn_with_its_attractor(tmp_path, monkeypatch):
    """A saved run of ff_recurrent_mnist.py: the goodness of each label over the iterations
    (whose sum over iterations 3-5 is the read-out's score), the confusion matrix, the
    bottom-up weights of layer 1 and the curves."""
    load = ff.load_mnist
    monkeypatch.setattr(ff, "load_mnist", lambda data_dir=None: load(data_dir)[:2] + tuple(
        a[:100] for a in load(data_dir)[2:]))
    run_dir, outdir = str(tmp_path / "run"), str(tmp_path / "viz")
    assert ff_recurrent.main(["--layer-sizes", "784,30,20", "--n-train", "400", "--batch-size",
                              "50", "--n-epochs", "1", "--out", run_dir]) == 0
    assert viz.main(["--run", run_dir, "--outdir", outdir, "--n-eval", "100"]) == 0
    for name in ("attractor.png", "confusion_matrix.png", "weights_layer1.png",
                 "classifier_curves.png"):
        image = iio.imread(os.path.join(outdir, name))
        assert image[..., :3].std() > 5, f"{name} is blank"
    run = ff_runs.load_run(run_dir)
    numbers = read_numbers(outdir)
    # every test digit drawn: the confusion matrix's error is the run's own read-out
    assert numbers["goodness_error_on_drawn_digits"] == run.metrics["goodness_test_error"]
    digits = ff.load_mnist()[2][:4]
    g = viz.goodness_by_iteration(run, digits)
    scores = ff_recurrent.goodness_per_label(run.weights, run.biases, digits, run.cfg)
    np.testing.assert_allclose(g[:, :, 2:5].sum(axis=2), scores, rtol=1e-5)


def test_locally_connected_run_is_drawn(tmp_path, mnist):
    """The figures read a saved run of ff_local_mnist.py, its layers' blocks: layer 1's
    weights are drawn as 28 x 28 images, 0 outside each unit's receptive field; a GIF frame
    draws such a network's goodness too."""
    local = ["--local", "10:6:4,2:1:5", "--top-k", "2", "--n-train", "500", "--batch-size", "50",
             "--head", "sgd", "--softmax-epochs", "2", "--n-epochs", "1"]
    run_dir, outdir = str(tmp_path / "run"), str(tmp_path / "viz")
    assert ff_local.main(local + ["--out", run_dir]) == 0
    assert viz.main(["--run", run_dir, "--outdir", outdir, "--n-eval", "200"]) == 0
    for name in PNGS:
        assert iio.imread(os.path.join(outdir, name))[..., :3].std() > 5, f"{name} is blank"
    assert len(read_numbers(outdir)["separation_sigma"]) == 2
    run = ff_runs.load_run(run_dir)
    W = viz.first_layer_weights(run)
    mask = ff_local.local_masks(ff_local.parse_local("10:6:4"))[0]
    assert W.shape == (784, 64) and (W[mask == 0] == 0).all() and (W[mask == 1] != 0).all()
    # the GIF trains ff_hybrid_mnist.py's runs only; its frame draws whatever network it is given
    cfg = run.cfg
    state = types.SimpleNamespace(weights=run.weights, biases=run.biases, history=run.ff_history)
    real, hybrids = viz.evaluation_set(mnist[2], 100, np.random.default_rng(0), cfg.n_blur)
    bins = [viz.goodness_bins(cfg.layer_threshold(n)) for n in cfg.layer_sizes[1:]]
    frame = gif.render_frame(cfg, state, 0, real, hybrids, bins)
    assert frame.shape == (480, 720, 3) and frame.std() > 5


def test_converged_head_run_draws_its_fits(converged_run, tmp_path):
    run_dir, outdir = converged_run[0], str(tmp_path / "viz")
    assert viz.main(["--run", run_dir, "--outdir", outdir]) == 0
    run = ff_runs.load_run(run_dir)
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


@pytest.mark.parametrize("flags, script", [(["--negatives", "label"], "ff_label_mnist.py"),
                                           (["--hard-negatives"], "ff_label_mnist.py"),
                                           (["--local", "10:6:4"], "ff_local_mnist.py")])
def test_a_run_the_visualiser_trains_is_a_hybrid_run(tmp_path, capsys, flags, script):
    """Without --run it trains with ff_hybrid_mnist.py's flags; another script's flag is
    refused before anything is made, naming the script whose runs --run then draws."""
    with pytest.raises(SystemExit) as e:
        viz.main(TINY + flags + ["--out", str(tmp_path / "run"), "--outdir", str(tmp_path / "v")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "is not a flag of" in err and script in err
    assert not os.listdir(tmp_path)


def test_untrained_and_label_runs_draw_no_wrong_reference(tmp_path, recwarn):
    untrained = str(tmp_path / "untrained")
    assert ff.main(TINY + ["--n-epochs", "0", "--out", untrained]) == 0
    fig = viz.classifier_curves_figure(ff_runs.load_run(untrained))
    fig.savefig(str(tmp_path / "u.png"))
    assert "no FF epochs" in " ".join(t.get_text() for t in fig.axes[0].texts)
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]
    label = str(tmp_path / "label")
    assert ff_label.main(TINY + ["--n-epochs", "1", "--out", label]) == 0
    fig = viz.classifier_curves_figure(ff_runs.load_run(label))
    assert not [l for l in fig.axes[1].get_lines() if "1.37" in str(l.get_label())]
