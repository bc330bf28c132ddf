"""Locally-connected layers: the connectivity, the block form's gradient against finite
differences, the block form against the dense masked form it replaced (outputs, gradients,
initial weights, a tiny real run), and runs that are saved and resumed."""

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_local_mnist as ff_local
import ff_runs
from conftest import QUIET, StopTraining
from conftest import layer_step
from test_layer import numeric_grad, rel_err

LOCAL = "10:6:4,2:1:5,2:1:3"  # 28x28 image -> 4x4x4 -> 3x3x5 -> 2x2x3


def test_masks_follow_the_grid():
    local = ff_local.parse_local(LOCAL)
    assert ff_local.local_layer_sizes(local) == (784, 64, 45, 12)
    m1, m2, m3 = ff_local.local_masks(local)
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


def test_index_lists_the_inputs_the_mask_connects():
    """Row l of a layer's index is, in order, the inputs that the mask connects to every
    channel of location l, so blocks and masked matrix hold the same weights."""
    local = ff_local.parse_local(LOCAL)
    indexes = ff_local.local_index(local)
    assert [i.shape for i in indexes] == [(16, 100), (9, 16), (4, 20)]
    for index, mask in zip(indexes, ff_local.local_masks(local)):
        channels = mask.shape[1] // len(index)
        for unit in range(mask.shape[1]):
            np.testing.assert_array_equal(np.flatnonzero(mask[:, unit]), index[unit // channels])
    blocks = np.random.default_rng(0).standard_normal((9, 16, 5)).astype(np.float32)
    dense = ff_local.local_dense(blocks, indexes[1], 64)
    assert (dense[ff_local.local_masks(local)[1] == 0] == 0).all()
    np.testing.assert_array_equal(ff_local.local_blocks(dense, indexes[1]), blocks)


@pytest.mark.parametrize("peer_coef", [0.0, 0.7])
def test_block_gradient_matches_finite_differences(peer_coef):
    """Every parameter of the block form (each block entry, each bias), float64."""
    rng = np.random.default_rng(0)
    index = ff_local.local_index(ff_local.parse_local("2:1:3"), side=3)[0]  # 9 inputs -> 2x2x3 = 12 units
    kind = ff_local.LocalLayer(index)
    x = ff.l2_normalize(rng.random((10, 9)))
    W = rng.standard_normal((4, 4, 3)) * 2
    b = rng.standard_normal(12) * 0.3
    h0 = ff.layer_forward(x, W, b, kind=kind)
    assert (h0 == 0).any() and (h0 > 0).any()
    g0 = ff.goodness(h0)
    threshold, peer_mean = float(np.median(g0)), rng.random(12)

    def loss():
        return layer_step(x, W, b, 5, threshold, "mean", peer_coef, peer_mean, kind=kind)[0]

    _, dW, db, *_ = layer_step(x, W, b, 5, threshold, "mean", peer_coef, peer_mean, kind=kind)
    assert dW.shape == W.shape
    assert rel_err(dW, numeric_grad(loss, W, h=1e-5)).max() < 1e-6
    assert rel_err(db, numeric_grad(loss, b, h=1e-5)).max() < 1e-6


def dense_masked_grads(masks):
    """layer_grads as the dense masked form computed it (x^T dz times the mask), for a
    network whose layers all have different shapes."""
    by_shape = {m.shape: m for m in masks}

    def grads(x, dz, dW, kind=None, fields=None):
        np.matmul(x.T, dz, out=dW)
        dW *= by_shape[dW.shape]
        return dW, dz.sum(axis=0)
    return grads


def test_block_form_gives_the_dense_masked_forms_outputs_and_gradients():
    """float32, the first two layers of LOCAL on real digits: activities, loss, dW and db
    agree to float32 rounding."""
    x_train = ff.load_mnist()[0][:40]
    cfg = ff_local.LocalConfig(local=LOCAL, top_k=1)
    local = cfg.local_layers
    blocks = ff.FFState.fresh(cfg, np.random.default_rng(0)).weights
    x = ff.l2_normalize(x_train)
    grads = dense_masked_grads(ff_local.local_masks(local))
    for l, (index, mask) in enumerate(list(zip(ff_local.local_index(local), ff_local.local_masks(local)))[:2]):
        b = np.random.default_rng(l).standard_normal(mask.shape[1]).astype(np.float32) * 0.1
        dense = ff_local.local_dense(blocks[l], index, mask.shape[0])
        got = layer_step(x, blocks[l], b, 20, 0.5, kind=ff_local.LocalLayer(index))
        h_dense = ff.layer_forward(x, dense, b)
        loss, _ = ff.ff_loss_and_dz(h_dense, 20, 0.5, "mean", dz := np.empty_like(h_dense))
        dW_dense, db_dense = grads(x, dz, np.empty_like(dense))
        assert (got[3] > 0).mean() > 0.2  # enough units on for the comparison to mean much
        np.testing.assert_allclose(got[3], h_dense, rtol=1e-5, atol=1e-6)
        assert abs(got[0] - loss) < 1e-5 * abs(loss)
        scale = np.abs(dW_dense).max()
        np.testing.assert_allclose(ff_local.local_dense(got[1], index, mask.shape[0]), dW_dense,
                                   rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_allclose(got[2], db_dense, rtol=1e-4, atol=1e-6 * np.abs(db_dense).max())
        x = ff.l2_normalize(got[3])


def test_a_seed_draws_the_dense_masked_forms_initial_weights():
    """Bit for bit: the dense draw times the mask, scaled by sqrt(n_in / fan_in) (the masked
    form's init), and the generator left in the same state for the batches."""
    cfg = ff_local.LocalConfig(local=LOCAL, top_k=1)
    state = ff.FFState.fresh(cfg, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    for l, (mask, index) in enumerate(zip(ff_local.local_masks(cfg.local_layers),
                                          ff_local.local_index(cfg.local_layers))):
        W = rng.standard_normal(mask.shape) * np.sqrt(2.0)
        W *= mask * np.sqrt(mask.shape[0] / mask.sum(axis=0))
        assert state.weights[l].shape == index.shape + (mask.shape[1] // len(index),)
        np.testing.assert_array_equal(ff_local.local_dense(state.weights[l], index, mask.shape[0]),
                                      W.astype(np.float32))
    assert state.rng.integers(1 << 30) == rng.integers(1 << 30)


def test_training_moves_the_weights_inside_the_fields():
    """That no weight outside a receptive field is ever nonzero is now structural: the blocks
    hold only the weights inside the fields. Training moves most of them."""
    x_train = ff.load_mnist()[0][:600]
    cfg = ff_local.LocalConfig(local=LOCAL, n_epochs=1, batch_size=50, top_k=1, weight_decay=0.01)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    start = [W.copy() for W in state.weights]
    ff.train_ff(x_train, cfg, state, **QUIET)
    for W0, W, index in zip(start, state.weights, ff_local.local_index(cfg.local_layers)):
        assert W.shape == W0.shape and W.shape[:2] == index.shape
        assert (W != W0).mean() > 0.5


TINY_LOCAL = ["--local", "10:6:8,2:1:8", "--top-k", "2", "--n-train", "1000",
              "--batch-size", "50", "--softmax-epochs", "5", "--head", "sgd", "--softmax-lr", "1", "--n-epochs", "2"]


def test_tiny_run_gives_the_dense_masked_forms_numbers(tmp_path, monkeypatch):
    """The same run in both forms: --local 10:6:8,2:1:8 against 784-128-72 dense with the
    masked init and the masked gradient (what the masked form computed). Loss,
    real-vs-hybrid accuracy, the head's errors and the weights agree to float32 rounding."""
    assert ff_local.main(TINY_LOCAL + ["--out", str(tmp_path / "blocks")]) == 0
    blocks = ff_runs.load_run(str(tmp_path / "blocks"))
    assert type(blocks.cfg) is ff_local.LocalConfig
    local, sizes = blocks.cfg.local_layers, blocks.cfg.layer_sizes
    indexes, masks = ff_local.local_index(local), ff_local.local_masks(local)
    kinds = blocks.cfg.layer_kinds()
    start = ff.FFState.fresh(blocks.cfg, np.random.default_rng(blocks.cfg.seed)).weights
    init = ff.init_network

    def masked_init(layer_sizes, rng, dense_kinds=None, init_kind="sqrt2"):
        assert dense_kinds == [None, None]  # the dense run's layers
        weights, biases = init(layer_sizes, rng, kinds, init_kind)
        return [ff_local.local_dense(W, i, n) for W, i, n in zip(weights, indexes, sizes)], biases

    # FFState.fresh and train_layer_step (ff_hybrid_mnist) look both up in the core's globals
    monkeypatch.setattr(ff, "init_network", masked_init)
    monkeypatch.setattr(ff, "layer_grads", dense_masked_grads(masks))
    dense_flags = TINY_LOCAL[2:] + ["--layer-sizes", ",".join(map(str, sizes))]
    assert ff.main(dense_flags + ["--out", str(tmp_path / "dense")]) == 0
    dense = ff_runs.load_run(str(tmp_path / "dense"))
    assert type(dense.cfg) is ff.FFConfig
    for W, D, W0, index, n_in in zip(blocks.weights, dense.weights, start, indexes, sizes):
        moved = D - ff_local.local_dense(W0, index, n_in)
        assert np.linalg.norm(moved) > 0.02 * np.linalg.norm(D)
        apart = np.linalg.norm(ff_local.local_dense(W, index, n_in) - D)
        assert apart < 1e-5 * np.linalg.norm(moved)  # measured 1e-6
    for key in ("ff_loss", "real_vs_hybrid_accuracy"):
        np.testing.assert_allclose(blocks.metrics[key], dense.metrics[key], rtol=1e-5)
    for key in ("test_error", "train_error"):  # a digit or two may fall the other way
        assert abs(blocks.metrics[key] - dense.metrics[key]) <= 2e-4
    assert blocks.metrics["test_error"] < 0.7  # the head learns (measured 0.51; chance 0.9)


def cut_after_one_epoch(out, flags):
    """Start ff_local_mnist.py's run of `flags` in folder `out` and stop it after its first
    FF epoch, the way a kill would (checkpoint kept)."""
    def stop(epoch, state):
        raise StopTraining
    args = ff_runs.parse_args(flags + ["--out", str(out)],
                              ff_runs.build_parser(ff_local.LocalConfig))
    with pytest.raises(StopTraining):
        ff_runs.run_experiment(args, callback=stop, **QUIET)


def dense_form(path, cfg):
    """Rewrites an LC run's file as the masked form stored it: dense weights and dense
    optimiser state."""
    with np.load(path) as z:
        arrays = dict(z)
    for l, index in enumerate(ff_local.local_index(cfg.local_layers)):
        for key, a in arrays.items():
            if (key == f"W{l}" or key.startswith(f"opt_W{l}_")) and a.ndim == 3:
                arrays[key] = ff_local.local_dense(a, index, cfg.layer_sizes[l])
    np.savez(path, **arrays)


@pytest.mark.parametrize("stored", ["blocks", "dense masked"])
def test_resumed_local_run_ends_with_the_same_numbers(tmp_path, stored, capsys):
    """A locally-connected run cut after epoch 1 and resumed ends bit for bit where the
    uncut run ends; so does one whose checkpoint was saved by the dense masked form."""
    flags = ["--local", "10:6:4,2:1:5", "--top-k", "2", "--n-train", "600", "--batch-size", "50",
             "--head", "sgd", "--softmax-epochs", "2", "--n-epochs", "2", "--peer-norm", "0.1"]
    assert ff_local.main(flags + ["--out", str(tmp_path / "full")]) == 0
    cut_after_one_epoch(tmp_path / "cut", flags)
    cfg = ff_runs.read_checkpoint_config(str(tmp_path / "cut"))[0]
    assert type(cfg) is ff_local.LocalConfig
    if stored == "dense masked":
        dense_form(tmp_path / "cut" / "checkpoint.npz", cfg)
        with np.load(tmp_path / "cut" / "checkpoint.npz") as z:
            assert z["W0"].shape == (784, 64) and z["opt_W1_m"].shape == (64, 45)
    # only the script that made the run resumes it
    capsys.readouterr()
    assert ff.main(["--resume", str(tmp_path / "cut")]) == 2
    assert capsys.readouterr().err == (f"error: the run in {tmp_path / 'cut'} was made by "
                                       "ff_local_mnist.py; resume it with ff_local_mnist.py\n")
    assert ff_local.main(["--resume", str(tmp_path / "cut")]) == 0
    full, resumed = ff_runs.load_run(str(tmp_path / "full")), ff_runs.load_run(str(tmp_path / "cut"))
    assert [W.shape for W in resumed.weights] == [(16, 100, 4), (9, 16, 5)]
    for W1, W2 in zip(full.weights, resumed.weights):
        np.testing.assert_array_equal(W1, W2)
    assert resumed.ff_history["loss"] == full.ff_history["loss"]
    assert resumed.metrics["test_error"] == full.metrics["test_error"]
    dense_form(tmp_path / "full" / "model.npz", cfg)  # a finished run of the masked form
    for W1, W2 in zip(ff_runs.load_run(str(tmp_path / "full")).weights, resumed.weights):
        np.testing.assert_array_equal(W1, W2)
    _, _, x_test, y_test = ff.load_mnist()
    F = ff.extract_features(full.weights, full.biases, x_test, 2, kinds=full.cfg.layer_kinds())
    assert ff.error_rate(F, y_test, *full.head) == full.metrics["test_error"]
    with pytest.raises(ValueError, match=r"kinds=cfg\.layer_kinds\(\)"):
        ff.network_activities(full.weights, full.biases, x_test[:5])


def test_local_configuration_sets_or_checks_the_layer_sizes():
    assert ff_local.LocalConfig(local=LOCAL, top_k=3).layer_sizes == (784, 64, 45, 12)
    assert ff_local.LocalConfig(local=LOCAL, layer_sizes=(784, 64, 45, 12), top_k=3).local == LOCAL
    for bad, words in (("10:6", "RF:STRIDE:CHANNELS"), ("30:1:4", "does not fit"),
                       ("10:6:0", "positive")):
        with pytest.raises(ValueError, match=words):
            ff_local.LocalConfig(local=bad)
    with pytest.raises(ValueError, match="leave --layer-sizes out"):
        ff_local.LocalConfig(local=LOCAL, layer_sizes=(784, 100, 100, 100))
    # the layers are the kind LocalConfig hands the core; the hybrid script's are dense
    kinds = ff_local.LocalConfig(local=LOCAL, top_k=3).layer_kinds()
    assert [type(k) for k in kinds] == [ff_local.LocalLayer] * 3
    for kind, index in zip(kinds, ff_local.local_index(ff_local.parse_local(LOCAL))):
        np.testing.assert_array_equal(kind.index, index)
    assert ff.FFConfig().layer_kinds() == [None] * 4
    with pytest.raises(TypeError, match="local"):
        ff.FFConfig(local=LOCAL)
