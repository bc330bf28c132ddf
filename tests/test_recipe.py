"""The author's supervised recipe: RMS normalisation, the ungated peer term, smoothed-gradient
SGD, and a float64 replay of two epochs written the way his Matlab code reads.

The replay uses the Matlab code's own constants (learning rate 0.01, weight cost 0.001, peer
coefficient 0.03) and its ascent direction (1 - p) y, which is half the gradient of log p;
the module is run with the flags the README gives for the recipe (0.005, 0.002, 0.06), so
the test also checks that mapping. Only the random draws (a permutation per epoch, then one
wrong label per digit) are taken from the module, in the order train_ff makes them.
"""
import copy

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
from conftest import layer_step
from test_layer import numeric_grad, rel_err, small_layer

RECIPE = dict(hard_negatives=True, hard_from="head", optimizer="sgd",
              normalize="rms", init="fan-in", goodness="sum", threshold=1.0, peer_norm=0.06,
              peer_kind="author", lr=0.005, weight_decay=0.002, lr_decay="linear-half-epochs",
              hard_head_lr=0.1, hard_head_weight_decay=0.003)


def test_rms_normalize_gives_unit_mean_square_along_the_l2_direction():
    x = np.random.default_rng(0).random((20, 50))
    r = ff.rms_normalize(x)
    np.testing.assert_allclose((r ** 2).mean(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(r / np.sqrt(50), ff.l2_normalize(x), rtol=1e-6)


def test_author_peer_term_is_the_gradient_of_a_linear_term_with_r_fixed():
    """With the running means r held fixed, the term is the gradient of
    coef/n_pos sum_pos sum_j (r_j - mean r) z_j: ungated, so units that are off get it too."""
    rng = np.random.default_rng(1)
    x, W, b, n_pos = small_layer(rng)
    threshold, coef = float(np.median(ff.goodness(ff.layer_forward(x, W, b), "sum"))), 0.7
    peer_mean = rng.random(W.shape[1])
    _, dW, db, h, _, r = layer_step(x, W, b, n_pos, threshold, "sum", coef, peer_mean, "author")
    assert (h[:n_pos] == 0).any()  # the ungated part is checked on units that are off
    np.testing.assert_allclose(r, 0.9 * peer_mean + 0.1 * h[:n_pos].mean(axis=0))

    def loss():
        z = x @ W + b
        return (layer_step(x, W, b, n_pos, threshold, "sum")[0]
                + coef / n_pos * (z[:n_pos] @ (r - r.mean())).sum())

    assert rel_err(dW, numeric_grad(loss, W)).max() < 1e-6
    assert rel_err(db, numeric_grad(loss, b)).max() < 1e-6


def test_smoothed_sgd_steps_like_the_matlab_update():
    rng = np.random.default_rng(2)
    p = rng.standard_normal(30)
    opt = ff.SmoothedSGD(p, weight_decay=0.01)
    want, g = p.copy(), np.zeros(30)
    for lr in (0.1, 0.1, 0.05):
        grad = rng.standard_normal(30)
        g = 0.9 * g + 0.1 * grad
        want = want + lr * (-g - 0.01 * want)
        opt.step(p, grad.copy(), lr)
    np.testing.assert_allclose(p, want, rtol=1e-12)


def test_author_lr_decay_is_constant_then_linear_by_epoch():
    cfg = ff.FFConfig(n_epochs=10, lr=1.0, lr_decay="linear-half-epochs")
    gains = [ff.learning_rate(cfg, e, 0.5) for e in range(10)]
    assert gains[:5] == [1.0] * 5
    np.testing.assert_allclose(gains[5:], [0.9, 0.7, 0.5, 0.3, 0.1])
    assert ff.learning_rate(cfg, 7, 0.0) == ff.learning_rate(cfg, 7, 0.99)


def rms(x):
    return x / (np.sqrt((x ** 2).mean(axis=1, keepdims=True)) + 1e-8)


def with_label(digits, labels):
    x = digits.astype(np.float64).copy()
    x[:, :10] = 0.1 if labels is None else 0.0
    if labels is not None:
        x[np.arange(len(x)), labels] = 1.0
    return x


def matlab_replay(x_train, y_train, n_epochs, B, weights, biases, rng):
    """Weights, biases, peer means and head after n_epochs, as ffnew.m computes them."""
    eps, wc, lam, eps_sup, wc_sup, delay = 0.01, 0.001, 0.03, 0.1, 0.003, 0.9
    W = [w.astype(np.float64) for w in weights]
    b = [v.astype(np.float64) for v in biases]
    gW, gb = [np.zeros_like(w) for w in W], [np.zeros_like(v) for v in b]
    mean_states = [np.full(len(v), 0.5) for v in b]
    head_W = np.zeros((sum(w.shape[1] for w in W[1:]), 10))
    head_b, head_gW, head_gb = np.zeros(10), np.zeros_like(head_W), np.zeros(10)
    n = len(x_train)
    for epoch in range(1, n_epochs + 1):
        gain = 1.0 if epoch <= n_epochs / 2 else (1 + 2 * (n_epochs - epoch)) / n_epochs
        order = rng.permutation(n)
        u = [rng.random(B) for _ in range(n // B)]  # the epoch's draws for the wrong labels
        for i in range(n // B):
            rows = order[i * B:(i + 1) * B]
            digits, y = x_train[rows], y_train[rows]
            targets = np.eye(10)[y]
            # the neutral label, its normalised states feeding the softmax of layers 2 and up
            x, features = with_label(digits, None), []
            for l in range(len(W)):
                x = np.maximum(rms(x) @ W[l] + b[l], 0)
                if l >= 1:
                    features.append(rms(x))
            F = np.concatenate(features, axis=1)
            logits = F @ head_W + head_b
            wrong = ff_label.sample_wrong_labels(logits, y, u[i])
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            head_gW = delay * head_gW + (1 - delay) * F.T @ (targets - p) / B
            head_gb = delay * head_gb + (1 - delay) * (targets - p).sum(axis=0) / B
            head_W = head_W + gain * eps_sup * (head_gW - wc_sup * head_W)
            head_b = head_b + gain * eps_sup * head_gb
            # positives, then negatives; every layer sees the states from before the update
            xs = {"pos": with_label(digits, y), "neg": with_label(digits, wrong)}
            asc_W = [np.zeros_like(w) for w in W]
            asc_b = [np.zeros_like(v) for v in b]
            for kind in ("pos", "neg"):
                x = xs[kind]
                for l in range(len(W)):
                    x_hat = rms(x)
                    states = np.maximum(x_hat @ W[l] + b[l], 0)
                    prob = 1 / (1 + np.exp(-((states ** 2).sum(axis=1) - states.shape[1])))
                    if kind == "pos":
                        d = (1 - prob)[:, None] * states
                        mean_states[l] = 0.9 * mean_states[l] + 0.1 * states.mean(axis=0)
                        d = d + lam * (mean_states[l].mean() - mean_states[l])
                    else:
                        d = -prob[:, None] * states
                    asc_W[l] += x_hat.T @ d
                    asc_b[l] += d.sum(axis=0)
                    x = states
            for l in range(len(W)):
                gW[l] = delay * gW[l] + (1 - delay) * asc_W[l] / B
                gb[l] = delay * gb[l] + (1 - delay) * asc_b[l] / B
                b[l] = b[l] + gain * eps * gb[l]
                W[l] = W[l] + gain * eps * (gW[l] - wc * W[l])
    return W, b, mean_states, (head_W, head_b)


@pytest.mark.parametrize("n_epochs", [2])
def test_recipe_matches_a_float64_replay_of_the_matlab_code(mnist, n_epochs):
    x_train, y_train = mnist[0][:300], mnist[1][:300]
    cfg = ff_label.LabelConfig(layer_sizes=(784, 24, 16, 12), n_epochs=n_epochs, batch_size=50,
                               top_k=2, **RECIPE)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    start_w, start_b = [w.copy() for w in state.weights], [v.copy() for v in state.biases]
    rng = copy.deepcopy(state.rng)
    ff.train_ff(x_train, cfg, state, log=lambda *a, **k: None, y_train=y_train)
    W, b, mean_states, head = matlab_replay(x_train, y_train, n_epochs, 50, start_w, start_b,
                                            rng)
    for l in range(3):
        moved, got = W[l] - start_w[l], state.weights[l] - start_w[l]
        assert np.linalg.norm(moved) > 1e-3 * np.linalg.norm(start_w[l]), f"layer {l + 1}"
        assert np.linalg.norm(got - moved) < 1e-3 * np.linalg.norm(moved), f"layer {l + 1}"
        moved_b = b[l] - start_b[l]
        assert np.linalg.norm(state.biases[l] - b[l]) < 1e-3 * np.linalg.norm(moved_b)
        np.testing.assert_allclose(state.peer_means[l], mean_states[l], rtol=1e-4, atol=1e-6)
    for got, want in zip(state.head, head):
        assert np.linalg.norm(got - want) < 1e-3 * np.linalg.norm(want)
