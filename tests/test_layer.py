"""Layer maths: the hand-derived FF gradient against central finite differences in float64."""
import numpy as np
import pytest

import ff_hybrid_mnist as ff
from conftest import layer_step


def rel_err(a, b):
    return np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-12)


def numeric_grad(f, p, h=1e-6):
    g = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        old = p[i]
        p[i] = old + h
        up = f()
        p[i] = old - h
        down = f()
        p[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def small_layer(rng, n_in=12, n_out=7, n_pos=5):
    x = ff.l2_normalize(rng.standard_normal((2 * n_pos, n_in)))
    W = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0)
    b = rng.standard_normal(n_out) * 0.3
    return x, W, b, n_pos


@pytest.mark.parametrize("goodness_kind", ["mean", "sum"])
@pytest.mark.parametrize("peer_coef", [0.0, 0.7])
def test_ff_gradient_matches_finite_differences(goodness_kind, peer_coef):
    rng = np.random.default_rng(1)
    x, W, b, n_pos = small_layer(rng)
    h0 = ff.layer_forward(x, W, b)
    g0 = ff.goodness(h0, goodness_kind)
    # threshold at the median goodness: rows on both sides, so both softplus branches count
    threshold = float(np.median(g0))
    assert (g0 > threshold).any() and (g0 < threshold).any()
    assert (h0 == 0).any(), "some units must be inactive to check the ReLU mask"
    peer_mean = rng.random(W.shape[1])

    def loss():
        return layer_step(x, W, b, n_pos, threshold, goodness_kind, peer_coef, peer_mean)[0]

    _, dW, db, *_ = layer_step(x, W, b, n_pos, threshold, goodness_kind, peer_coef, peer_mean)
    assert rel_err(dW, numeric_grad(loss, W)).max() < 1e-6
    assert rel_err(db, numeric_grad(loss, b)).max() < 1e-6


def test_peer_running_mean_and_penalty():
    rng = np.random.default_rng(2)
    x, W, b, n_pos = small_layer(rng)
    peer_mean = rng.random(W.shape[1])
    loss0, *_ = layer_step(x, W, b, n_pos, 1.0)
    loss, _, _, h, _, r = layer_step(x, W, b, n_pos, 1.0, "mean", 0.5, peer_mean)
    expected_r = 0.9 * peer_mean + 0.1 * h[:n_pos].mean(axis=0)
    np.testing.assert_allclose(r, expected_r)
    np.testing.assert_allclose(loss - loss0, 0.5 * np.var(expected_r))


def test_loss_value_and_stability():
    """The loss is mean over pairs of softplus(theta - g_pos) + softplus(g_neg - theta), finite
    and warning-free at extreme goodness."""
    rng = np.random.default_rng(3)
    x, W, b, n_pos = small_layer(rng)
    loss, _, _, h, g, _ = layer_step(x, W, b, n_pos, 2.0)
    expected = (np.log1p(np.exp(2.0 - g[:n_pos])).sum() + np.log1p(np.exp(g[n_pos:] - 2.0)).sum()) / n_pos
    np.testing.assert_allclose(loss, expected)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for scale in (1e4, 1e-4):
            out = layer_step(x, W * scale, b * scale, n_pos, 2.0)
            assert all(np.isfinite(np.asarray(v)).all() for v in out[:3])


def test_float32_hot_path_agrees_with_float64():
    rng = np.random.default_rng(4)
    x, W, b, n_pos = small_layer(rng, n_in=30, n_out=20, n_pos=8)
    work = ff.LayerWork.allocate(2 * n_pos, 30, 20)
    out32 = layer_step(x.astype(np.float32), W.astype(np.float32), b.astype(np.float32), n_pos,
                       1.0, work=work)
    out64 = layer_step(x, W, b, n_pos, 1.0)
    assert out32[1].dtype == np.float32 and out32[1] is work.dW
    np.testing.assert_allclose(out32[1], out64[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out32[0], out64[0], rtol=1e-5)


def test_l2_normalize_and_init_goodness():
    rng = np.random.default_rng(5)
    x = rng.random((50, 784)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(ff.l2_normalize(x), axis=1), 1, rtol=1e-5)
    weights, biases = ff.init_network((784, 400, 400), rng)
    assert all(W.dtype == np.float32 for W in weights) and all((b == 0).all() for b in biases)
    # N(0, sqrt 2) weights on unit-norm input: z ~ N(0, 2), so E[mean relu(z)^2] = 1
    g = ff.goodness(ff.network_activities(weights, biases, x)[0])
    assert 0.8 < g.mean() < 1.2
