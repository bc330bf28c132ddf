"""Locally-connected layers: the connectivity, the masked gradient against finite
differences, and weights outside a unit's receptive field that stay exactly zero."""
import numpy as np
import pytest

import ff_hybrid_mnist as ff
from conftest import layer_step
from test_layer import numeric_grad, rel_err

LOCAL = "10:6:4,2:1:5,2:1:3"  # 28x28 image -> 4x4x4 -> 3x3x5 -> 2x2x3


def test_masks_follow_the_grid():
    local = ff.parse_local(LOCAL)
    assert ff.local_layer_sizes(local) == (784, 64, 45, 12)
    m1, m2, m3 = ff.local_masks(local)
    assert m1.shape == (784, 64) and m2.shape == (64, 45) and m3.shape == (45, 12)
    # layer 1, grid location (1, 2), channel 3: the 10x10 pixel block at rows 6-15, cols 12-21
    unit = (1 * 4 + 2) * 4 + 3
    want = np.zeros((28, 28))
    want[6:16, 12:22] = 1
    np.testing.assert_array_equal(m1[:, unit].reshape(28, 28), want)
    # layer 2, location (2, 0): all 4 channels of locations (2..3, 0..1) of the 4x4 grid
    unit = (2 * 3 + 0) * 5 + 1
    below = m2[:, unit].reshape(4, 4, 4)
    assert below[2:4, 0:2].all() and below.sum() == 16
    assert (m3.sum(axis=0) == 2 * 2 * 5).all()


@pytest.mark.parametrize("peer_coef", [0.0, 0.7])
def test_masked_gradient_matches_finite_differences(peer_coef):
    """Only the weights inside the mask are parameters; their gradient is checked."""
    rng = np.random.default_rng(0)
    mask = ff.local_masks(ff.parse_local("2:1:3"), side=3)[0]  # 9 inputs -> 2x2x3 = 12 units
    x = ff.l2_normalize(rng.random((10, 9)))
    W = rng.standard_normal(mask.shape) * mask * 2
    b = rng.standard_normal(12) * 0.3
    g0 = ff.goodness(ff.layer_forward(x, W, b))
    threshold, peer_mean = float(np.median(g0)), rng.random(12)

    def loss():
        return layer_step(x, W, b, 5, threshold, "mean", peer_coef, peer_mean,
                                       mask=mask)[0]

    _, dW, db, *_ = layer_step(x, W, b, 5, threshold, "mean", peer_coef,
                                            peer_mean, mask=mask)
    inside = mask == 1
    assert rel_err(dW[inside], numeric_grad(loss, W, h=1e-5)[inside]).max() < 1e-6
    assert (dW[~inside] == 0).all()
    assert rel_err(db, numeric_grad(loss, b, h=1e-5)).max() < 1e-6


def test_training_keeps_weights_outside_the_receptive_fields_at_zero():
    x_train = ff.load_mnist()[0][:600]
    cfg = ff.FFConfig(local=LOCAL, n_epochs=1, batch_size=50, top_k=1, weight_decay=0.01)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    start = [W.copy() for W in state.weights]
    ff.train_ff(x_train, cfg, state, log=lambda *a, **k: None)
    for W0, W, mask in zip(start, state.weights, ff.local_masks(cfg.local_layers)):
        assert (W0[mask == 0] == 0).all() and (W[mask == 0] == 0).all()
        assert (W[mask == 1] != W0[mask == 1]).mean() > 0.5  # the local weights learn


def test_local_configuration_sets_or_checks_the_layer_sizes():
    assert ff.FFConfig(local=LOCAL, top_k=3).layer_sizes == (784, 64, 45, 12)
    assert ff.FFConfig(local=LOCAL, layer_sizes=(784, 64, 45, 12), top_k=3).local == LOCAL
    for bad, words in (("10:6", "RF:STRIDE:CHANNELS"), ("30:1:4", "does not fit"),
                       ("10:6:0", "positive")):
        with pytest.raises(ValueError, match=words):
            ff.FFConfig(local=bad)
    with pytest.raises(ValueError, match="leave --layer-sizes out"):
        ff.FFConfig(local=LOCAL, layer_sizes=(784, 100, 100, 100))
