"""The recurrent network with top-down connections (ff_recurrent_mnist.py, the paper's section
4): the damped layer's hand-derived gradient against central finite differences in float64,
the dynamics and a step's gradients against a plain float64 re-implementation, the batches,
tiny real runs through main (run files, the read-out, --resume), and the flags it refuses."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_recurrent_mnist as rec
import ff_runs
from conftest import QUIET, StopTraining
from test_layer import numeric_grad

SCRIPT = "ff_recurrent_mnist.py"


def rel_err(a, b):
    """|a - b| / max(|a|, |b|) over a whole block, in float64."""
    return np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), 1e-12)


def norm(v):
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-8)


def relu(z):
    return np.maximum(z, 0)


# -- the damped layer's gradient --------------------------------------------------------------

@pytest.mark.parametrize("goodness_kind", ["mean", "sum"])
def test_damped_layer_gradient_matches_finite_differences(goodness_kind):
    """One layer's FF loss at one iteration, h = 0.3 h_prev + 0.7 ReLU([below, above] W + b)
    with the states of t-1 constant: the hand-derived dL/dW (its bottom-up and its top-down
    rows) and dL/db agree with central differences to 1e-6; without the factor 0.7 or the
    ReLU mask they would be off by more than 1e-2."""
    rng = np.random.default_rng(0)
    n_pos, n_below, n_above, n_out, d = 4, 6, 5, 7, 0.3
    x = np.hstack([norm(rng.standard_normal((2 * n_pos, n_below))),
                   norm(rng.standard_normal((2 * n_pos, n_above)))])
    W = rng.standard_normal((n_below + n_above, n_out)) * np.sqrt(2.0)
    b = rng.standard_normal(n_out) * 0.3
    h_prev = np.abs(rng.standard_normal((2 * n_pos, n_out)))  # on where z <= 0 too
    g0 = ff.goodness(d * h_prev + (1 - d) * relu(x @ W + b), goodness_kind)
    threshold = float(np.median(g0))  # rows on both sides of it
    dz = np.empty((2 * n_pos, n_out))

    def loss_and_grads():
        new = x @ W + b
        h = rec.damped_update(new, h_prev.copy(), d)
        loss, _ = ff.ff_loss_and_dz(h, n_pos, threshold, goodness_kind, dz)
        rec.damped_dz(dz, new, d, np.empty(dz.shape, bool))
        dW, db = ff.layer_grads(x, dz, np.empty_like(W))
        return loss, dW, db, new

    _, dW, db, new = loss_and_grads()
    assert (new == 0).any(), "some units must be off (z <= 0) while their damped state is on"
    loss = lambda: loss_and_grads()[0]  # noqa: E731
    numeric_W, numeric_b = numeric_grad(loss, W), numeric_grad(loss, b)
    for block in (slice(0, n_below), slice(n_below, None)):  # bottom-up rows, top-down rows
        assert rel_err(dW[block], numeric_W[block]) < 1e-6
    assert rel_err(db, numeric_b) < 1e-6
    # what the check would see of a dropped factor 0.7 or a dropped mask
    assert rel_err(dW / (1 - d), numeric_W) > 1e-2
    h = d * h_prev + (1 - d) * relu(x @ W + b)
    unmasked = np.empty_like(dz)
    ff.ff_loss_and_dz(h, n_pos, threshold, goodness_kind, unmasked)
    assert rel_err(x.T @ ((1 - d) * unmasked), numeric_W) > 1e-2


# -- the dynamics against a plain float64 re-implementation -----------------------------------

def reference_states(weights, biases, image, label, d, T, norm=norm):
    """The paper's dynamics written plainly: states[t][l] = h_l^t, t = 0 the bottom-up pass
    (top-down input 0), then synchronous damped updates from the normalised states of t-1."""
    L = len(weights)
    h, below = [], norm(image)
    for W, b in zip(weights, biases):
        h.append(relu(below @ W[:below.shape[1]] + b))
        below = norm(h[-1])
    states = [h]
    for _ in range(T):
        prev = states[-1]
        states.append([
            d * prev[l] + (1 - d) * relu(
                np.hstack([norm(image) if l == 0 else norm(prev[l - 1]),
                           norm(label) if l == L - 1 else norm(prev[l + 1])]) @ weights[l]
                + biases[l])
            for l in range(L)])
    return states


def small_network(layer_sizes, rows, seed=0, **fields):
    rng = np.random.default_rng(seed)
    cfg = rec.RecurrentConfig(layer_sizes=layer_sizes, batch_size=rows // 2, n_train=600,
                              **fields)
    weights, biases = cfg.fresh_network(rng)
    biases = [rng.standard_normal(b.shape).astype(np.float32) * 0.3 for b in biases]
    labels = rng.integers(0, 10, rows)
    x = np.zeros((rows, cfg.batch_width))
    x[:, :784] = ff.load_mnist()[0][:rows]
    rec.one_hot(labels, out=x[:, 784:])
    return cfg, weights, biases, x


@pytest.mark.parametrize("layer_sizes", [(784, 12, 9, 7), (784, 6)], ids=["3 layers", "1 layer"])
def test_dynamics_match_a_plain_float64_reimplementation(layer_sizes):
    """run_dynamics in float64: every state h_l^t, t = 1..8, is the plain re-implementation's
    (bottom-up pass, damping 0.3, both neighbours' states of t-1, the label at the top)."""
    cfg, weights, biases, x = small_network(layer_sizes, rows=6)
    weights, biases = ([W.astype(np.float64) for W in weights],
                       [b.astype(np.float64) for b in biases])
    before = x.copy()
    work = rec.RecurrentWork.allocate(cfg.layer_sizes, 6, 2, dtype=np.float64)
    seen = {(t, l): work.h[l].copy()
            for t, l in rec.run_dynamics(weights, biases, x, cfg, work, 8)}
    want = reference_states(weights, biases, x[:, :784], x[:, 784:], 0.3, 8)
    assert sorted(seen) == [(t, l) for t in range(1, 9) for l in range(len(weights))]
    for (t, l), h in seen.items():
        np.testing.assert_allclose(h, want[t][l], rtol=1e-12, atol=1e-12, err_msg=f"t {t}, l {l}")
    np.testing.assert_array_equal(x, before)
    assert any((want[t][l] != want[t - 1][l]).any()
               for t in range(2, 9) for l in range(len(weights)))


def test_goodness_read_out_sums_every_layer_over_iterations_3_to_5():
    cfg, weights, biases, _ = small_network((784, 12, 9), rows=4)
    digits = ff.load_mnist()[2][:3]
    scores = rec.goodness_per_label(weights, biases, digits, cfg, chunk=2)  # a short last chunk
    w64, b64 = [W.astype(np.float64) for W in weights], [b.astype(np.float64) for b in biases]
    for k in range(10):
        states = reference_states(w64, b64, digits, np.eye(10)[[k] * 3], 0.3, 8)
        want = sum(ff.goodness(states[t][l]) for t in (3, 4, 5) for l in range(2))
        np.testing.assert_allclose(scores[:, k], want, rtol=1e-5)


def test_step_sums_local_gradients_over_iterations_and_steps_once():
    """One recurrent_step: each layer's optimiser is called once, with sum_t of dL_t/dW and
    dL_t/db, each local to layer and time step (the states of t-1 constant), all from the
    weights the batch started with; the loss it reports is the mean over the iterations."""
    T, d, B = 4, 0.3, 3
    cfg, weights, biases, x = small_network((784, 12, 9, 7), rows=2 * B, n_iterations=T,
                                            readout_last=4, threshold=1.0)
    x[B:, :784] = x[:B, :784]

    class Recorder:
        def __init__(self):
            self.grads = []

        def step(self, param, grad, lr):
            self.grads.append(grad.copy())
    state = ff.FFState.fresh(cfg, np.random.default_rng(1))
    state.weights, state.biases = [W.copy() for W in weights], [b.copy() for b in biases]
    state.opt_w, state.opt_b = [Recorder() for _ in weights], [Recorder() for _ in biases]
    yielded = list(rec.recurrent_step(state, x.astype(np.float32), cfg, 0.1,
                                      cfg.step_buffers(np)))
    w64, b64 = [W.astype(np.float64) for W in weights], [b.astype(np.float64) for b in biases]
    states = reference_states(w64, b64, x[:, :784], x[:, 784:], d, T)
    L, s = len(weights), np.r_[-np.ones(B), np.ones(B)]
    for l in range(L):
        dW, db, losses = np.zeros_like(w64[l]), np.zeros_like(b64[l]), []
        for t in range(1, T + 1):
            prev = states[t - 1]
            inp = np.hstack([norm(x[:, :784]) if l == 0 else norm(prev[l - 1]),
                             norm(x[:, 784:]) if l == L - 1 else norm(prev[l + 1])])
            z, h = inp @ w64[l] + b64[l], states[t][l]
            margin = s * (np.mean(h ** 2, axis=1) - 1.0)
            losses.append(np.logaddexp(0, margin).sum() / B)
            dh = (s / (1 + np.exp(-margin)) / B)[:, None] * 2 * h / h.shape[1]
            dz = (1 - d) * dh * (z > 0)
            dW += inp.T @ dz
            db += dz.sum(0)
        assert len(state.opt_w[l].grads) == 1 and len(state.opt_b[l].grads) == 1
        assert rel_err(state.opt_w[l].grads[0], dW) < 1e-4, l
        assert rel_err(state.opt_b[l].grads[0], db) < 1e-4, l
        assert yielded[l][0] == l and np.isclose(yielded[l][1], np.mean(losses), rtol=1e-5)


# -- the batches ---------------------------------------------------------------------------------

def test_batches_pair_each_digit_with_its_label_and_a_wrong_one():
    x_train, y_train, _, _ = ff.load_mnist()
    x_train, y_train = x_train[:1000], y_train[:1000]
    cfg = rec.RecurrentConfig(batch_size=100)
    x = np.empty((200, cfg.batch_width), np.float32)
    seen, wrong = [], []
    state = SimpleNamespace(rng=np.random.default_rng(0))
    for _ in rec.recurrent_batches(x_train, y_train, cfg, state, x):
        np.testing.assert_array_equal(x[:100, :784], x[100:, :784])  # the same digits
        assert np.all(x[:, 784:].sum(1) == 1) and np.all(x[:, 784:].max(1) == 1)  # one-hot
        rows = [np.flatnonzero((x_train == row).all(1))[0] for row in x[:100, :784]]
        np.testing.assert_array_equal(x[:100, 784:].argmax(1), y_train[rows])
        wrong.append(x[100:, 784:].argmax(1) - y_train[rows])
        seen += rows
    assert sorted(seen) == list(range(1000))
    counts = np.bincount(np.concatenate(wrong) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 70  # the nine wrong labels, about 111 each


@pytest.mark.parametrize("layer_sizes, normalize",
                         [((784, 12, 9, 7), "l2"), ((784, 6), "l2"), ((784, 12, 9), "rms")],
                         ids=["3 layers", "1 layer", "rms"])
def test_first_iteration_scores_are_the_top_layers_logits_after_one_iteration(layer_sizes,
                                                                              normalize):
    """The scores the wrong labels are drawn from: for each label, the top layer's goodness
    minus its threshold at iteration 1 of the plain re-implementation with that label."""
    cfg, weights, biases, x = small_network(layer_sizes, rows=4, normalize=normalize)
    w64, b64 = [W.astype(np.float64) for W in weights], [b.astype(np.float64) for b in biases]
    scores = rec.first_iteration_scores(w64, b64, x[:, :784], cfg)
    n_top = layer_sizes[-1]
    nrm = norm if normalize == "l2" else lambda v: norm(v) * np.sqrt(v.shape[1])
    for k in range(10):
        states = reference_states(w64, b64, x[:, :784], np.eye(10)[[k] * 4], 0.3, 1, nrm)
        want = ff.goodness(states[1][-1]) - cfg.layer_threshold(n_top)
        np.testing.assert_allclose(scores[:, k], want, rtol=1e-6)
    assert np.ptp(scores, axis=1).min() > 0  # the label matters


def test_hard_negatives_follow_the_networks_preference():
    """With --hard-negatives the wrong label is never the digit's own and is drawn in
    proportion to softmax(first_iteration_scores): a network whose top-down weights favour
    label 3 strongly draws 3 for nearly every digit that is not a 3."""
    x_train, y_train, _, _ = ff.load_mnist()
    x_train, y_train = x_train[:1000], y_train[:1000]
    cfg = rec.RecurrentConfig(layer_sizes=(784, 20, 10), batch_size=100, hard_negatives=True)
    weights, biases = cfg.fresh_network(np.random.default_rng(0))
    weights[-1][20 + 3] += 20.0  # label 3's top-down row: a large goodness with label 3
    state = SimpleNamespace(rng=np.random.default_rng(0), weights=weights, biases=biases)
    x = np.empty((200, cfg.batch_width), np.float32)
    wrong, right = [], []
    for _ in rec.recurrent_batches(x_train, y_train, cfg, state, x):
        right.append(x[:100, 784:].argmax(1))
        wrong.append(x[100:, 784:].argmax(1))
    right, wrong = np.concatenate(right), np.concatenate(wrong)
    assert np.all(wrong != right)
    assert np.mean(wrong[right != 3] == 3) > 0.95
    cfg.hard_negatives = False  # uniform: about 1/9 each
    state.rng = np.random.default_rng(0)
    uniform = np.concatenate([x[100:, 784:].argmax(1) for _ in
                              rec.recurrent_batches(x_train, y_train, cfg, state, x)])
    assert np.mean(uniform == 3) < 0.2


# -- tiny real runs through main ---------------------------------------------------------------

TINY = ["--layer-sizes", "784,40,40", "--n-train", "600", "--batch-size", "50",
        "--n-epochs", "2", "--val-size", "200", "--lr", "0.03"]  # 24 steps: a higher rate


@pytest.fixture
def small_test_set(monkeypatch):
    """The runs read out 500 test digits, not 10,000: the tests stay fast."""
    load = ff.load_mnist

    def load_mnist(data_dir=None):
        x_train, y_train, x_test, y_test = load(data_dir)
        return x_train, y_train, x_test[:500], y_test[:500]
    monkeypatch.setattr(ff, "load_mnist", load_mnist)


def test_tiny_run_writes_the_run_files_and_reads_out_by_goodness(tmp_path, small_test_set):
    """2 epochs of 784-40-40 on 600 digits: the run files and the paper's read-out, better
    than the untrained network's (measured: 60.6% test error against 89.6%)."""
    assert rec.main(TINY + ["--out", str(tmp_path / "run")]) == 0
    for name in ("args.json", "checkpoint.npz", "model.npz", "history.json", "metrics.json"):
        assert (tmp_path / "run" / name).exists(), name
    with open(tmp_path / "run" / "metrics.json") as f:
        metrics = json.load(f)
    with open(tmp_path / "run" / "args.json") as f:
        assert json.load(f)["script"] == SCRIPT
    assert 0 <= metrics["goodness_val_error"] <= 1 and metrics["goodness_test_error"] < 0.7
    assert "test_error" not in metrics  # no softmax head
    assert len(metrics["pos_vs_neg_accuracy"]) == 2
    with np.load(tmp_path / "run" / "model.npz") as z:
        assert z["W0"].shape == (784 + 40, 40) and z["W1"].shape == (40 + 10, 40)
    assert rec.main(TINY + ["--n-epochs", "0", "--out", str(tmp_path / "untrained")]) == 0
    with open(tmp_path / "untrained" / "metrics.json") as f:
        untrained = json.load(f)
    assert untrained["goodness_test_error"] > 0.7


def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, small_test_set):
    flags = TINY + ["--n-epochs", "3", "--lr-decay", "linear-half"]
    assert rec.main(flags + ["--out", str(tmp_path / "full")]) == 0

    def stop(epoch, state):
        raise StopTraining
    args = ff_runs.parse_args(flags + ["--out", str(tmp_path / "cut")],
                              ff_runs.build_parser(rec.RecurrentConfig))
    with pytest.raises(StopTraining):
        ff_runs.run_experiment(args, callback=stop, **QUIET)
    assert rec.main(["--resume", str(tmp_path / "cut")]) == 0
    full, resumed = (ff_runs.load_run(str(tmp_path / name)) for name in ("full", "cut"))
    assert type(resumed.cfg) is rec.RecurrentConfig
    for W1, W2 in zip(full.weights + full.biases, resumed.weights + resumed.biases):
        np.testing.assert_array_equal(W1, W2)
    assert resumed.ff_history["loss"] == full.ff_history["loss"]
    assert resumed.metrics["goodness_test_error"] == full.metrics["goodness_test_error"]


# -- the flags it refuses ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--local", "10:6:4"], "--local is not a flag of ff_recurrent_mnist.py: it belongs to "
                            "ff_local_mnist.py"),
    (["--hard-from", "head"], "--hard-from is not a flag of ff_recurrent_mnist.py: it "
                              "belongs to ff_label_mnist.py"),
    (["--softmax-epochs", "5"], "--softmax-epochs 5 must be 0"),
    (["--schedule", "greedy"], "--schedule greedy is for a feed-forward script"),
    (["--readout-last", "9"], "--readout-last 9 exceeds --n-iterations 8"),
    (["--damping", "1"], "--damping 1.0 must be below 1"),
])
def test_a_flag_it_cannot_use_is_refused(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        rec.main(flags + ["--dry-run"])
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_a_flag_it_would_ignore_is_refused_and_the_others_refuse_its_flags(capsys):
    assert rec.main(["--top-k", "1", "--dry-run"]) == 2
    assert "--top-k is given but unused: it needs a softmax head" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ff.main(["--damping", "0.5", "--dry-run"])
    assert e.value.code == 2 and ("--damping is not a flag of ff_hybrid_mnist.py: it belongs "
                                  f"to {SCRIPT}") in capsys.readouterr().err
