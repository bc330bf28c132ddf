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
    W, b, hist = ff.train_softmax(F[:500], y[:500], F[500:], y[500:], rng, n_epochs=10,
                                  lr=0.1, weight_decay=0.0, n_classes=3, log=lambda *a, **k: None)
    # the head starts at W = 0 (every class tied, argmax 0): about 2/3 wrong on 3 classes
    untrained = ff.error_rate(F[500:], y[500:], np.zeros((20, 3), np.float32), np.zeros(3))
    assert untrained > 0.5 and hist["test_error"][-1] < 0.05
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert ff.error_rate(F[500:], y[500:], W, b) == hist["test_error"][-1]


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
