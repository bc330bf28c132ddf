"""Softmax head: gradient check and training on separable data."""
import numpy as np

import ff_hybrid_mnist as ff
from test_layer import numeric_grad, rel_err


def test_softmax_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    F = rng.standard_normal((9, 6))
    y = rng.integers(0, 4, 9)
    W = rng.standard_normal((6, 4))
    b = rng.standard_normal(4)
    loss = lambda: ff.softmax_loss_and_grads(F, y, W, b, 0.3)[0]
    _, dW, db, _ = ff.softmax_loss_and_grads(F, y, W, b, 0.3)
    assert rel_err(dW, numeric_grad(loss, W)).max() < 1e-6
    assert rel_err(db, numeric_grad(loss, b)).max() < 1e-6


def test_softmax_loss_value():
    F = np.eye(3)
    W = np.log(np.array([[2.0, 1, 1], [1, 1, 1], [1, 1, 6]]))
    loss = ff.softmax_loss_and_grads(F, np.array([0, 1, 2]), W, np.zeros(3))[0]
    np.testing.assert_allclose(loss, -(np.log(0.5) + np.log(1 / 3) + np.log(0.75)) / 3)


def test_softmax_learns_separable_classes():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((3, 20)) * 3
    y = rng.integers(0, 3, 600)
    F = (centers[y] + rng.standard_normal((600, 20))).astype(np.float32)
    W, b, hist = ff.train_softmax(F[:500], y[:500], rng, n_epochs=10, lr=0.1, weight_decay=0.0,
                                  n_classes=3, log=lambda *a, **k: None, F_val=F[500:],
                                  y_val=y[500:])
    # the head starts at W = 0 (every class tied, argmax 0): about 2/3 wrong on 3 classes
    untrained = ff.error_rate(F[500:], y[500:], np.zeros((20, 3), np.float32), np.zeros(3))
    assert untrained > 0.5 and hist["val_error"][-1] < 0.05
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert ff.error_rate(F[500:], y[500:], W, b) == hist["val_error"][-1]
    assert len(hist["val_error"]) == len(hist["train_error"]) == 10 and "test_error" not in hist


def test_features_are_normalised_top_layers():
    rng = np.random.default_rng(2)
    weights, biases = ff.init_network((784, 30, 20, 10), rng)
    x = rng.random((7, 784)).astype(np.float32)
    F = ff.extract_features(weights, biases, x, top_k=2, chunk=3)
    assert F.shape == (7, 30) and F.dtype == np.float32
    # each block against a plain float64 forward pass: normalise, ReLU(x W + b), normalise
    a = x.astype(np.float64)
    blocks = []
    for W, b in zip(weights, biases):
        a = np.maximum((a / np.linalg.norm(a, axis=1, keepdims=True)) @ W + b, 0)
        blocks.append(a / np.linalg.norm(a, axis=1, keepdims=True))
    np.testing.assert_allclose(F[:, :20], blocks[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(F[:, 20:], blocks[2], rtol=1e-4, atol=1e-6)


def blobs(n, n_features=20, n_classes=3, spread=1.0, seed=1):
    """Gaussian classes around random centres, float64 features (so that the fit can be held
    to the tolerance: in float32 the line search may stop on rounding first), labels."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, n_features)) * 1.5
    y = rng.integers(0, n_classes, n)
    return centers[y] + spread * rng.standard_normal((n, n_features)), y  # float64: see below


def test_converged_head_reaches_the_optimum_that_sgd_does_not():
    F, y = blobs(600)
    wd = 1e-3
    W, b, hist = ff.fit_softmax_converged(F, y, wd, n_classes=3)
    loss, dW, db, _ = ff.softmax_loss_and_grads(F, y, W, b, wd)
    assert hist["converged"] and hist["grad_max"] <= ff.HEAD_GTOL
    # the module's own gradient, read afresh at the returned head, is below the tolerance
    assert max(np.abs(dW).max(), np.abs(db).max()) <= 2 * ff.HEAD_GTOL
    W_sgd, b_sgd, _ = ff.train_softmax(F, y, np.random.default_rng(0), n_epochs=20,
                                       lr=0.05, weight_decay=wd, n_classes=3,
                                       log=lambda *a, **k: None)
    loss_sgd = ff.softmax_loss_and_grads(F, y, W_sgd, b_sgd, wd)[0]
    assert loss < loss_sgd - 1e-3
    # and no nearby head does better: the optimum of a convex loss
    rng = np.random.default_rng(2)
    for _ in range(5):
        dW_, db_ = 1e-2 * rng.standard_normal(W.shape), 1e-2 * rng.standard_normal(b.shape)
        assert ff.softmax_loss_and_grads(F, y, W + dW_, b + db_, wd)[0] >= loss


def test_converged_head_is_the_same_from_any_start():
    F, y = blobs(400, seed=3)
    W0, b0, _ = ff.fit_softmax_converged(F, y, 1e-2, n_classes=3)
    rng = np.random.default_rng(4)
    start = (rng.standard_normal(W0.shape).astype(np.float32), np.ones(3, np.float32))
    W1, b1, _ = ff.fit_softmax_converged(F, y, 1e-2, start=start, n_classes=3)
    np.testing.assert_allclose(W1, W0, atol=1e-3)


def test_penalty_is_chosen_on_validation_and_the_test_set_plays_no_part(monkeypatch):
    # few noisy training digits: a weak penalty over-fits, so validation prefers a strong one
    F, y = blobs(2000, n_features=60, spread=2.5, seed=5)
    F_fit, y_fit, F_val, y_val = F[:60], y[:60], F[60:], y[60:]
    quiet = lambda *a, **k: None
    strengths = (1 / 60, 1 / 6, 10 / 6, 1000 / 6)  # weight decay 1, 0.1, 0.01, 1e-4 at n = 60
    seen = []
    real_error_rate = ff.error_rate
    monkeypatch.setattr(ff, "error_rate", lambda F_, *a, **k: (seen.append(F_), real_error_rate(F_, *a, **k))[1])
    W, b, hist = ff.fit_head_converged(F_fit, y_fit, F_val, y_val, strengths, log=quiet,
                                       n_classes=3)
    errors = {f["C"]: f["choice_error"] for f in hist["fits"]}
    assert sorted(errors) == sorted(strengths)
    assert hist["C"] == min(errors, key=lambda C: (errors[C], C))
    assert np.isclose(hist["weight_decay"], 1 / (hist["C"] * 60))
    assert len(set(errors.values())) > 1  # the choice was a real one
    assert all(s is F_val or s is F_fit for s in seen)
    assert hist["chosen_on"] == "the validation split"


def test_without_validation_the_penalty_is_chosen_on_held_back_fit_digits():
    F, y = blobs(300, seed=6)
    W, b, hist = ff.fit_head_converged(F, y, strengths=(0.1, 10.0), log=lambda *a, **k: None,
                                       n_classes=3)
    assert hist["chosen_on"] == "the last 150 of the head's training digits"
    assert hist["fits"][-1].get("final") and hist["fits"][-1]["converged"]
    # the final head is the optimum on every fit digit at the chosen C
    assert np.isclose(hist["weight_decay"], 1 / (hist["C"] * 300))
    W_all, b_all, _ = ff.fit_softmax_converged(F, y, hist["weight_decay"], n_classes=3)
    np.testing.assert_allclose(W, W_all, atol=1e-3)
