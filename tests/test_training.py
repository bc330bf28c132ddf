"""FF training loop: a plain float64 replay of train_ff, and a tiny real run that must learn.

The replay is written here from the paper's description, independently of the module's
buffers, chunked Adam and fused gradient: each layer L2-normalises the activities the
layer below had before its own update, h = ReLU(x W + b), g = mean (or sum) of h^2, loss
softplus(theta - g_pos) + softplus(g_neg - theta) averaged over the positives, textbook Adam.
Only the random draws (three permutations per epoch, then one mask per hybrid) are taken
from the module, in the order train_ff makes them, so both see the same pairs and masks.
"""
import copy

import numpy as np
import pytest

import ff_hybrid_mnist as ff


def softplus(t):
    return np.logaddexp(0.0, t)


def replay(x_train, cfg, weights, biases, rng):
    """Weights and biases after cfg.n_epochs of parallel FF training, all in float64."""
    W = [w.astype(np.float64) for w in weights]
    b = [v.astype(np.float64) for v in biases]
    m = [[np.zeros_like(p) for p in pair] for pair in zip(W, b)]
    v = [[np.zeros_like(p) for p in pair] for pair in zip(W, b)]
    t = 0
    n, B = len(x_train), cfg.batch_size
    n_batches = n // B
    for epoch in range(cfg.n_epochs):
        pos, pa, pb = rng.permutation(n), rng.permutation(n), rng.permutation(n)
        for i in range(n_batches):
            rows = slice(i * B, (i + 1) * B)
            a, other = x_train[pa[rows]], x_train[pb[rows]]
            mask = ff.make_masks(B, rng, cfg.n_blur)
            hybrids = np.where(mask, a, other)
            x = np.concatenate([x_train[pos[rows]], hybrids]).astype(np.float64)
            progress = (epoch + i / n_batches) / cfg.n_epochs
            lr = cfg.lr * (min(1.0, 2 * (1 - progress)) if cfg.lr_decay == "linear-half" else 1)
            sign = np.concatenate([-np.ones(B), np.ones(B)])  # -1 real, +1 hybrid
            t += 1
            for l in range(len(W)):
                x_hat = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)  # a silent row stays 0
                h = np.maximum(x_hat @ W[l] + b[l], 0)
                n_units = h.shape[1]
                if cfg.goodness == "mean":
                    g, theta, dg_dh = (h ** 2).mean(axis=1), cfg.threshold, 2 * h / n_units
                else:
                    g, theta, dg_dh = (h ** 2).sum(axis=1), cfg.threshold * n_units, 2 * h
                # d/dg softplus(s (g - theta)) = s sigmoid(s (g - theta)); ReLU's mask is in h
                dL_dg = sign / (1 + np.exp(-sign * (g - theta))) / B
                dz = dL_dg[:, None] * dg_dh * (h > 0)
                grads = (x_hat.T @ dz, dz.sum(axis=0))
                for k, (p, grad) in enumerate(zip((W[l], b[l]), grads)):
                    m[l][k] = 0.9 * m[l][k] + 0.1 * grad
                    v[l][k] = 0.999 * v[l][k] + 0.001 * grad ** 2
                    m_hat, v_hat = m[l][k] / (1 - 0.9 ** t), v[l][k] / (1 - 0.999 ** t)
                    p -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)
                x = h  # the next layer sees this layer's output before its update
    return W, b


def train_and_replay(cfg, n=300, seed=0):
    x_train = ff.load_mnist()[0][:n]
    state = ff.FFState.fresh(cfg, np.random.default_rng(seed))
    start_w = [w.copy() for w in state.weights]
    start_b = [v.copy() for v in state.biases]
    rng = copy.deepcopy(state.rng)
    ff.train_ff(x_train, cfg, state, log=lambda *a, **k: None)
    want_w, want_b = replay(x_train, cfg, start_w, start_b, rng)
    return start_w, state, want_w, want_b


@pytest.mark.parametrize("changes", [
    {},
    {"goodness": "sum", "threshold": 0.5},
    {"lr_decay": "linear-half", "threshold": 8.0},
])
def test_train_ff_matches_a_plain_float64_replay(changes):
    cfg = ff.FFConfig(layer_sizes=(784, 24, 16, 12), n_epochs=2, batch_size=50, **changes)
    start_w, state, want_w, want_b = train_and_replay(cfg)
    for l in range(3):
        moved = want_w[l] - start_w[l]
        got = state.weights[l] - start_w[l]
        # 12 Adam steps move a weight by up to 12 lr; float32 rounding is ~1e-6 of that
        assert np.linalg.norm(moved) > 0.1 * cfg.lr * np.sqrt(moved.size)
        assert np.linalg.norm(got - moved) < 1e-3 * np.linalg.norm(moved), f"layer {l + 1}"
        np.testing.assert_allclose(state.biases[l], want_b[l], rtol=0, atol=1e-3 * cfg.lr)


def rank_auc(higher, lower):
    """Probability that a random element of `higher` exceeds one of `lower` (0.5 = chance)."""
    ranks = np.concatenate([higher, lower]).argsort().argsort()
    n = len(higher)
    return (ranks[:n].sum() - n * (n - 1) / 2) / (n * len(lower))


def test_tiny_real_run_tells_digits_from_hybrids():
    """2 epochs on 3000 real digits: on held-out test digits and their hybrids, every layer
    ranks real digits above hybrids far more often than chance, and layer 1 already
    classifies them at its threshold. An untrained network is at 0.5 on both (measured
    0.48-0.52), so does a loop that skips the update, swaps the two sides or feeds real
    digits as negatives."""
    x_train, _, x_test, _ = ff.load_mnist()
    cfg = ff.FFConfig(layer_sizes=(784, 100, 100, 100), n_epochs=2, batch_size=50)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    ff.train_ff(x_train[:3000], cfg, state, log=lambda *a, **k: None)
    hybrids, _ = ff.make_hybrid_batch(x_test[:1000], x_test[1000:2000],
                                      np.random.default_rng(5), cfg.n_blur)
    real_hs = ff.network_activities(state.weights, state.biases, x_test[2000:3000])
    hybrid_hs = ff.network_activities(state.weights, state.biases, hybrids)
    for l, (hr, hh) in enumerate(zip(real_hs, hybrid_hs)):
        g_real, g_hybrid = ff.goodness(hr), ff.goodness(hh)
        assert rank_auc(g_real, g_hybrid) > 0.6, f"layer {l + 1}"  # measured 0.64-0.80
        assert np.median(g_real) > np.median(g_hybrid), f"layer {l + 1}"
    g_real, g_hybrid = ff.goodness(real_hs[0]), ff.goodness(hybrid_hs[0])
    accuracy = ((g_real > cfg.threshold).mean() + (g_hybrid < cfg.threshold).mean()) / 2
    assert accuracy > 0.65  # measured 0.72
