"""Label negatives (the paper's section 3.3): the label in the first 10 pixels, a wrong
label as the negative, prediction by the label with the most goodness."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
import ff_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embed_labels_writes_one_hot_and_neutral_codes():
    rng = np.random.default_rng(0)
    x = rng.random((5, 784)).astype(np.float32)
    labels = np.array([0, 3, 9, 3, 7])
    before = x.copy()
    out = ff_label.embed_labels(x, labels)
    np.testing.assert_array_equal(x, before)  # a new array; x is left as it was
    want = np.zeros((5, 10), np.float32)
    want[np.arange(5), labels] = ff_label.LABEL_ON
    np.testing.assert_array_equal(out[:, :10], want)
    np.testing.assert_array_equal(out[:, 10:], x[:, 10:])
    np.testing.assert_array_equal(ff_label.embed_labels(x, None)[:, :10], np.float32(ff_label.LABEL_NEUTRAL))
    # every label gives a digit the same input norm, so L2 normalisation cannot leak it
    norms = [np.linalg.norm(ff_label.embed_labels(x, np.full(5, k)), axis=1) for k in range(10)]
    np.testing.assert_allclose(norms, np.broadcast_to(norms[0], (10, 5)), rtol=1e-6)


def test_label_batches_pair_each_digit_with_its_label_and_a_wrong_one():
    x_train, y_train, _, _ = ff.load_mnist()
    x_train, y_train = x_train[:2000], y_train[:2000]
    cfg = ff_label.LabelConfig(batch_size=100)
    x = np.empty((200, 784), np.float32)
    wrong_counts = np.zeros((10, 10))
    rng = np.random.default_rng(0)
    seen = []
    for _ in ff_label.label_batches(x_train, y_train, cfg, SimpleNamespace(rng=rng), x):
        pos_label, neg_label = x[:100, :10].argmax(1), x[100:, :10].argmax(1)
        np.testing.assert_array_equal(x[:100, 10:], x[100:, 10:])  # the same digits
        rows = [np.flatnonzero((x_train[:, 10:] == row).all(1))[0] for row in x[:100, 10:]]
        np.testing.assert_array_equal(pos_label, y_train[rows])
        assert np.all(neg_label != pos_label)
        np.add.at(wrong_counts, (pos_label, neg_label), 1)
        seen += rows
    assert sorted(seen) == list(range(2000))  # each digit once per epoch
    # the nine wrong labels are drawn uniformly: about 2000/90 = 22 per (true, wrong) cell
    off_diagonal = wrong_counts[~np.eye(10, dtype=bool)]
    assert off_diagonal.min() > 5 and off_diagonal.max() < 45


@pytest.mark.parametrize("hard", [False, True, "head"], ids=["uniform", "hard", "hard-head"])
def test_tiny_label_run_predicts_by_goodness(hard):
    """2 epochs on 3000 digits: the goodness read-out gets most test digits right (measured
    29% error against 90% for chance). Swapping the right and wrong labels, or not writing
    the label into the input, leaves it at or beyond chance."""
    x_train, y_train, x_test, y_test = ff.load_mnist()
    cfg = ff_label.LabelConfig(layer_sizes=(784, 100, 100, 100), n_epochs=2, batch_size=50,
                               hard_negatives=bool(hard),
                               hard_from="head" if hard == "head" else "goodness",
                               hard_head_lr=1.0 if hard == "head" else 0.1)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    ff.train_ff(x_train[:3000], cfg, state, log=lambda *a, **k: None, y_train=y_train[:3000])
    if hard == "head":  # its error on the digits it was trained on, epoch by epoch
        errors = state.history["head_error"]
        assert len(errors) == 2 and errors[1] < errors[0] < 0.9
    scores = ff_label.goodness_per_label(state.weights, state.biases, x_test[:1000])
    assert scores.shape == (1000, 10)
    assert np.mean(scores.argmax(1) != y_test[:1000]) < 0.45
    assert ff_label.goodness_error_rate(state.weights, state.biases, x_test[:1000], y_test[:1000],
                                        first_layer=1) < 0.45


def test_goodness_per_label_sums_the_chosen_layers():
    rng = np.random.default_rng(3)
    weights, biases = ff.init_network((784, 20, 15, 10), rng)
    x = rng.random((4, 784)).astype(np.float32)
    scores = ff_label.goodness_per_label(weights, biases, x, first_layer=2)
    for k in (0, 6):
        hs = ff.network_activities(weights, biases, ff_label.embed_labels(x, np.full(4, k)))
        np.testing.assert_allclose(scores[:, k], ff.goodness(hs[1]) + ff.goodness(hs[2]),
                                   rtol=1e-5)


def test_label_run_end_to_end_reports_both_read_outs(tmp_path):
    out = tmp_path / "run"
    assert ff_label.main(["--layer-sizes", "784,40,30", "--n-train", "600",
                          "--val-size", "300", "--batch-size", "50", "--n-epochs", "1",
                          "--softmax-epochs", "2", "--top-k", "2", "--out", str(out)]) == 0
    run = ff_runs.load_run(str(out))
    assert type(run.cfg) is ff_label.LabelConfig and run.cfg.negatives == "label"
    for key in ("goodness_val_error", "goodness_test_error", "val_error", "test_error"):
        assert 0 <= run.metrics[key] <= 1, key
    # the stored goodness read-out is reproduced from the saved weights
    _, _, x_test, y_test = ff.load_mnist()
    assert ff_label.goodness_error_rate(run.weights, run.biases, x_test, y_test) == \
        run.metrics["goodness_test_error"]


def test_sample_wrong_labels_follows_the_softmax_over_the_nine_wrong_labels():
    rng = np.random.default_rng(0)
    n = 40000
    # every row prefers label 0 by 2 nats over label 1 and by 4 over the rest
    scores = np.full((n, 10), 100.0)
    scores[:, 0], scores[:, 1] = 104.0, 102.0
    y = np.where(np.arange(n) < n // 2, 0, 5)  # half the rows are 0s: their 0 is not drawn
    wrong = ff_label.sample_wrong_labels(scores, y, rng.random(n))
    assert np.all(wrong != y) and wrong.min() >= 0 and wrong.max() <= 9
    for rows, true in ((slice(0, n // 2), 0), (slice(n // 2, n), 5)):
        logits = scores[0].copy()
        logits[true] = -np.inf
        want = np.exp(logits - logits.max())
        want /= want.sum()
        got = np.bincount(wrong[rows], minlength=10) / (n // 2)
        np.testing.assert_allclose(got, want, atol=0.012)
    # equal scores: uniform over the nine
    flat = ff_label.sample_wrong_labels(np.zeros((9000, 10)), np.full(9000, 4), rng.random(9000))
    counts = np.bincount(flat, minlength=10)
    assert counts[4] == 0 and counts[np.arange(10) != 4].min() > 850


def labels_of_one_epoch(x_train, y_train, cfg, state):
    """(wrong labels, true labels) written into one epoch of label_batches (batch 100)."""
    x = np.empty((200, 784), np.float32)
    negatives, trues = [], []
    for _ in ff_label.label_batches(x_train, y_train, cfg, state, x):
        negatives.append(x[100:, :10].argmax(1))
        trues.append(x[:100, :10].argmax(1))
    return np.concatenate(negatives), np.concatenate(trues)


def test_hard_negatives_draw_the_wrong_label_the_network_prefers():
    """A network whose layer 1 answers label pixel 3 far more than any other: with hard
    negatives every digit that is not a 3 gets the wrong label 3 (uniform draws: 1 in 9)."""
    x_train, y_train, _, _ = ff.load_mnist()
    x_train, y_train = x_train[:1000], y_train[:1000]
    rng = np.random.default_rng(0)
    for hard in (True, False):
        cfg = ff_label.LabelConfig(layer_sizes=(784, 20), batch_size=100, top_k=1,
                                   goodness_layer1=True, hard_negatives=hard)
        state = ff.FFState.fresh(cfg, rng)
        state.weights[0][3] = 100.0
        negatives, trues = labels_of_one_epoch(x_train, y_train, cfg, state)
        assert np.all(negatives != trues)
        share3 = np.mean(negatives[trues != 3] == 3)
        if hard:
            assert share3 == 1.0
        else:
            assert share3 < 0.2


def test_hard_negatives_belong_to_the_label_script():
    """Hard negatives are wrong labels: only ff_label_mnist.py has them. The hybrid
    configuration has no such field, and ff_hybrid_mnist.py refuses the flag in one line
    that names the script that has it."""
    assert ff_label.LabelConfig(hard_negatives=True).hard_negatives
    assert "hard_negatives" not in ff.FFConfig.__dataclass_fields__
    with pytest.raises(TypeError, match="hard_negatives"):
        ff.FFConfig(hard_negatives=True)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ff_hybrid_mnist.py"),
                          "--hard-negatives", "--dry-run"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert ("error: --hard-negatives is not a flag of ff_hybrid_mnist.py: it belongs to "
            "ff_label_mnist.py") in out.stderr, out.stderr
    with pytest.raises(SystemExit) as stop:  # called in-process too
        ff.main(["--hard-negatives", "--dry-run"])
    assert stop.value.code == 2


def test_hard_negative_head_step_reads_the_neutral_label_and_draws_wrong_labels():
    """One call of head_wrong_labels from a zero head: the labels drawn are wrong ones, and
    the head's SGD step is exactly -lr * F^T (1/10 - onehot(y)) / B (bias: the column
    sums), with F the normalised layers 2..L of the digits carrying the neutral label."""
    x_train, y_train, _, _ = ff.load_mnist()
    digits, y = x_train[:64], y_train[:64]
    cfg = ff_label.LabelConfig(layer_sizes=(784, 30, 20, 10), batch_size=64, n_train=64,
                               hard_negatives=True, hard_from="head", hard_head_lr=0.5)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    assert state.head[0].shape == (30, 10)
    wrong, errors, loss = ff_label.head_wrong_labels(state, digits, y, cfg,
                                                     np.empty((64, 784), np.float32),
                                                     np.random.default_rng(1).random(64))
    assert np.isclose(loss, np.log(10))
    assert np.all(wrong != y) and 0 <= errors <= 64
    F = ff.extract_features(state.weights, state.biases, ff_label.embed_labels(digits, None), 2)
    step = F.T.astype(np.float64) @ (0.1 - np.eye(10)[y]) / 64
    np.testing.assert_allclose(state.head[0], -0.5 * step, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(state.head[1], -0.5 * (0.1 - np.eye(10)[y]).mean(0), atol=1e-7)


def test_hard_negative_head_draws_the_label_it_prefers():
    """A head biased hard towards label 3: every digit that is not a 3 gets the wrong label
    3 over a whole epoch (the head's steps cannot undo a bias of 100 in 10 batches)."""
    x_train, y_train, _, _ = ff.load_mnist()
    x_train, y_train = x_train[:1000], y_train[:1000]
    cfg = ff_label.LabelConfig(layer_sizes=(784, 20, 20), batch_size=100, top_k=1,
                               hard_negatives=True, hard_from="head")
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    state.head[1][3] = 100.0
    negatives, trues = labels_of_one_epoch(x_train, y_train, cfg, state)
    assert np.all(negatives != trues) and np.all(negatives[trues != 3] == 3)
    assert len(state.history["head_error"]) == 1


def test_hard_from_head_needs_hard_negatives():
    with pytest.raises(ValueError, match="--hard-from head needs --hard-negatives"):
        ff_label.LabelConfig(hard_from="head")
    with pytest.raises(SystemExit) as stop:
        ff_label.main(["--hard-from", "head", "--dry-run"])
    assert stop.value.code == 2
