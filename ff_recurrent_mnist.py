"""Forward-Forward in a recurrent network with top-down connections (Hinton 2022, section 4,
"Using FF to model top-down effects in perception"), supervised.

The paper treats a static digit as a dull video of identical frames, processed by a
multi-layer recurrent network: the digit is clamped at the bottom for every frame, a
one-of-ten label at the top, and each hidden layer's activity at time t is computed from the
normalised activities of the layer below and the layer above at t-1. Its hidden layers (two
or three of 2000 units) are set by one bottom-up pass, then updated synchronously with
damping (new state = 0.3 x old + 0.7 x computed) for 8 iterations; a test digit is run with
each of the 10 labels and gets the label whose goodness, summed over iterations 3 to 5, is
highest: 1.31% test error after 60 epochs. Here, with h_0 the image and h_{L+1} the label, hidden layer l computes

    h_l^t = d h_l^{t-1} + (1 - d) ReLU([norm(h_{l-1}^{t-1}), norm(h_{l+1}^{t-1})] W_l + b_l)

with d = --damping (0.3), W_l the bottom-up rows over the top-down rows (the top-down weights
are the layer's own), and h^0 the bottom-up pass (top-down input 0).

Where the paper is silent this script chooses, and says so (docs/recurrent.md): each layer
learns from its own FF loss on the goodness of its state at every iteration 1..8 (not the
bottom-up pass, whose state no label reaches), the states of t-1 held constant (no
backpropagation through time), the gradients summed over the iterations, one optimiser step
per batch; the goodness read-out sums every hidden layer. The paper draws negatives' wrong
labels from the network's own predictions: --hard-negatives draws them in proportion to the
top layer's FF logits after one iteration with each label; without it they are uniform over
the other nine. (The paper is paraphrased here, not quoted: docs/recurrent.md says from what.)

Everything else is ff_hybrid_mnist.py's (the loader, the layer maths, the optimisers, the one
training loop, run files through ff_runs.py): this script hands the loop its batches (the image
and the label side by side in a row), its step (the recurrent dynamics) and its read-out.

    python3 ff_recurrent_mnist.py --hard-negatives --val-size 10000 --n-epochs 10
"""

import sys
import time
from dataclasses import dataclass

import numpy as np

if __name__ == "__main__":  # one module, however it was started: ff_runs imports it by name
    sys.modules.setdefault("ff_recurrent_mnist", sys.modules[__name__])

import ff_runs  # noqa: E402
from ff_devices import xp_of  # noqa: E402
from ff_hybrid_mnist import (FFConfig, N_CLASSES, NORMALIZE, ff_loss_and_dz,  # noqa: E402
                             goodness, init_weights, layer_forward, layer_grads)
from ff_label_mnist import sample_wrong_labels  # noqa: E402
from ff_runs import option  # noqa: E402


# -----------------------------------------------------------------------------
# The video: each row is one frame, the image and the label clamped side by side

def one_hot(labels, out):
    """The one-hot rows of labels, into out (n, 10)."""
    xp = xp_of(out)
    out[...] = 0
    out[xp.arange(len(out)), xp.asarray(labels)] = 1
    return out


def recurrent_batches(x_train, y_train, cfg, state, x):
    """One epoch of batches: x[:B] digits with their own label, x[B:] the same digits with a
    wrong label: drawn uniformly from the other nine (the draws of ff_label_mnist.py's uniform
    negatives, from the same stream), or with cfg.hard_negatives in proportion to the
    network's own preference, batch by batch (first_iteration_scores, sample_wrong_labels).
    Each row is [image | one-hot label]. Yields after filling x."""
    n, B, rng, xp = len(x_train), cfg.batch_size, state.rng, xp_of(x_train)
    n_batches, n_pixels = n // B, cfg.layer_sizes[0]
    pos = rng.permutation(n)
    steps = np.concatenate([rng.integers(1, N_CLASSES, B) for _ in range(n_batches)])
    wrong_all = xp.asarray((y_train[pos[:n_batches * B]] + steps) % N_CLASSES)
    rows, labels = xp.asarray(pos), xp.asarray(y_train[pos])
    for i in range(n_batches):
        batch = slice(i * B, (i + 1) * B)
        x[:B, :n_pixels] = x_train[rows[batch]]
        x[B:, :n_pixels] = x[:B, :n_pixels]
        one_hot(labels[batch], out=x[:B, n_pixels:])
        wrong = wrong_all[batch]
        if cfg.hard_negatives:
            scores = first_iteration_scores(state.weights, state.biases, x[:B, :n_pixels], cfg)
            wrong = sample_wrong_labels(scores, labels[batch], xp.asarray(rng.random(B)))
        one_hot(wrong, out=x[B:, n_pixels:])
        yield


def first_iteration_scores(weights, biases, images, cfg):
    """(n, 10): the network's scores for the ten labels of each image from one bottom-up
    pass: the FF logit (goodness - threshold) of the top hidden layer after the first
    iteration with each label clamped, the only layer a label reaches by then. All ten
    labels share the bottom-up pass; a label adds its own row of the top-down weights. The
    paper draws wrong labels in proportion to such probabilities (docs/recurrent.md)."""
    xp = xp_of(images, *weights)
    normalize, shapes = NORMALIZE[cfg.normalize], layer_shapes(cfg.layer_sizes)
    below = normalize(images)
    for l in range(len(weights) - 1):  # the bottom-up pass up to the top layer's input
        below = normalize(layer_forward(below, weights[l][:shapes[l][0]], biases[l]))
    W, n_below, n_out = weights[-1], shapes[-1][0], shapes[-1][2]
    z = xp.matmul(below, W[:n_below]) + biases[-1]
    labels = xp.matmul(normalize(xp.eye(N_CLASSES, dtype=W.dtype)), W[n_below:])
    h = xp.maximum(z[:, None, :] + labels, 0) * (1.0 - cfg.damping)
    h += cfg.damping * xp.maximum(z, 0)[:, None, :]  # the bottom-up state h^0, damped
    g = goodness(h.reshape(-1, n_out), cfg.goodness).reshape(len(images), N_CLASSES)
    return g - cfg.layer_threshold(n_out)


# -----------------------------------------------------------------------------
# Layer maths: the damped update and its hand-derived gradient

def damped_update(new, h, damping):
    """h <- damping h + (1 - damping) ReLU(z), in place, for z in `new`; `new` is left holding
    (1 - damping) ReLU(z), positive exactly where z > 0 (what damped_dz needs)."""
    xp = xp_of(new)
    xp.maximum(new, 0, out=new)
    new *= 1.0 - damping
    h *= damping
    h += new
    return h


def damped_dz(dh, new, damping, mask):
    """dL/dz from dL/dh, in place in dh, for h = d h_prev + (1 - d) ReLU(z) with h_prev held
    constant: dL/dz = (1 - d) dL/dh [z > 0]. new: damped_update's (1 - d) ReLU(z); mask: a
    boolean scratch of its shape. (ff_loss_and_dz's dL/dz of a plain layer is dL/dh here: its
    h carries no mask, since a damped unit can be on where z <= 0.)"""
    xp = xp_of(dh)
    xp.greater(new, 0, out=mask)
    xp.multiply(dh, mask, out=dh)
    dh *= 1.0 - damping
    return dh


def layer_shapes(layer_sizes):
    """(n_below, n_above, n_out) of each hidden layer: its weights are (n_below + n_above,
    n_out), the bottom-up rows first; the top layer's n_above is the 10 label units."""
    sizes = tuple(layer_sizes) + (N_CLASSES,)
    return [(sizes[l], sizes[l + 2], sizes[l + 1]) for l in range(len(layer_sizes) - 1)]


def hidden_rows(l, n_layers, n_below, n_above):
    """The rows of layer l's weights fed by hidden layers, whose states change: all but the
    bottom-up rows of layer 1 (the image) and the top-down rows of the top layer (the label).
    The clamped inputs' product is the same at every iteration, so it is made once a batch."""
    return slice(n_below if l == 0 else 0, n_below if l == n_layers - 1 else n_below + n_above)


# -----------------------------------------------------------------------------
# The dynamics: the bottom-up pass, then synchronous damped iterations

@dataclass
class RecurrentWork:
    """Buffers of the dynamics on `rows` rows, reused batch after batch: per layer, the
    normalised states of its hidden neighbours (one slot per iteration when training, where
    the gradients read them all again; two for the read-out), the clamped inputs' part of z,
    the state h, (1 - d) ReLU(z); when training, dL/dz at every iteration, their sum, dL/dW
    and a boolean mask."""
    inputs: list
    image: object
    label: object
    static: list
    h: list
    new: list
    dz: list = None
    dz_sum: list = None
    dW: list = None
    mask: list = None

    @classmethod
    def allocate(cls, layer_sizes, rows, n_slots, xp=np, training=False, dtype=np.float32):
        shapes, n_layers = layer_shapes(layer_sizes), len(layer_sizes) - 1

        def empty(*shape, kind=dtype):
            return xp.empty(shape, kind)
        hidden = [hidden_rows(l, n_layers, n_below, n_above)
                  for l, (n_below, n_above, _) in enumerate(shapes)]
        work = cls(inputs=[empty(n_slots, rows, s.stop - s.start) for s in hidden],
                   image=empty(rows, layer_sizes[0]), label=empty(rows, N_CLASSES),
                   static=[empty(rows, n_out) if l in (0, n_layers - 1) else None
                           for l, (_, _, n_out) in enumerate(shapes)],
                   h=[empty(rows, n_out) for _, _, n_out in shapes],
                   new=[empty(rows, n_out) for _, _, n_out in shapes])
        if training:
            work.dz = [empty(n_slots, rows, n_out) for _, _, n_out in shapes]
            work.dz_sum = [empty(rows, n_out) for _, _, n_out in shapes]
            work.dW = [empty(n_below + n_above, n_out) for n_below, n_above, n_out in shapes]
            work.mask = [empty(rows, n_out, kind=bool) for _, _, n_out in shapes]
        return work


def run_dynamics(weights, biases, x, cfg, work, n_iterations):
    """The network on rows x = [image | one-hot label]: the bottom-up pass sets the states
    h^0 (top-down input 0), then n_iterations synchronous damped iterations, every layer's
    h^t from the normalised states of t-1. Yields (t, l) once h_l^t is in work.h[l]
    (t = 1..n_iterations); the caller reads it before the generator goes on. The one forward
    pass of training, of the read-out and of the tests."""
    xp = xp_of(x, *weights)
    normalize, damping = NORMALIZE[cfg.normalize], cfg.damping
    shapes, n_layers, n_slots = layer_shapes(cfg.layer_sizes), len(weights), len(work.inputs[0])
    n_pixels = cfg.layer_sizes[0]
    hidden = [hidden_rows(l, n_layers, n_below, n_above)
              for l, (n_below, n_above, _) in enumerate(shapes)]
    # where a layer's top-down input starts among its hidden inputs (after the bottom-up one)
    top_down_at = [n_below - rows.start for (n_below, _, _), rows in zip(shapes, hidden)]

    def publish(l, slot):
        """h_l's normalised state into the inputs of the layers above and below, for the
        iteration that reads `slot`."""
        targets = []
        if l + 1 < n_layers:   # the bottom-up input of layer l + 1
            targets.append(work.inputs[l + 1][slot][:, :shapes[l + 1][0]])
        if l > 0:              # the top-down input of layer l - 1
            targets.append(work.inputs[l - 1][slot][:, top_down_at[l - 1]:])
        if targets:
            normalize(work.h[l], out=targets[0])
            for target in targets[1:]:
                xp.copyto(target, targets[0])

    normalize(x[:, :n_pixels], out=work.image)
    normalize(x[:, n_pixels:], out=work.label)
    # the clamped inputs' part of z (and the bias), the same at every iteration
    for l in sorted({0, n_layers - 1}):
        W, b, n_below, static = weights[l], biases[l], shapes[l][0], work.static[l]
        if l == 0:
            xp.matmul(work.image, W[:n_pixels], out=static)
        if l == n_layers - 1 and l > 0:
            xp.matmul(work.label, W[n_below:], out=static)
        elif l == n_layers - 1:  # one hidden layer: the image's part and the label's
            static += xp.matmul(work.label, W[n_below:], out=work.new[l])
        static += b
    # the bottom-up pass: the top-down input (the label too) is 0
    for l, (W, b) in enumerate(zip(weights, biases)):
        n_below = shapes[l][0]
        if l == 0 and n_layers > 1:  # layer 1's bottom-up z is its static part
            xp.maximum(work.static[0], 0, out=work.h[0])
        else:
            below = work.image if l == 0 else work.inputs[l][0][:, :n_below]
            layer_forward(below, W[:n_below], b, out=work.h[l])
        publish(l, 0)
    for t in range(1, n_iterations + 1):
        read = (t - 1) % n_slots
        for l, (W, b) in enumerate(zip(weights, biases)):
            static = b if work.static[l] is None else work.static[l]
            new = work.new[l]
            if hidden[l].stop > hidden[l].start:
                xp.matmul(work.inputs[l][read], W[hidden[l]], out=new)
                new += static
            else:  # one hidden layer: both its inputs are clamped
                xp.copyto(new, static)
            damped_update(new, work.h[l], damping)
            yield t, l
        if t < n_iterations:  # synchronous: the states of t are published once all are made
            for l in range(n_layers):
                publish(l, t % n_slots)


# -----------------------------------------------------------------------------
# One step: every layer's FF loss at every iteration, gradients local in time

def recurrent_buffers(cfg, xp):
    """What recurrent_step reuses: the dynamics' buffers on 2B rows with one slot per
    iteration, and each layer's goodness summed over the iterations."""
    rows = 2 * cfg.batch_size
    work = RecurrentWork.allocate(cfg.layer_sizes, rows, cfg.n_iterations, xp, training=True)
    return work, xp.empty((len(cfg.layer_sizes) - 1, rows), np.float32)


def recurrent_grads(work, l, cfg):
    """Layer l's dL/dW and dL/db summed over the iterations of a step: with X_t its input and
    dz_t its dL/dz at iteration t, dL/dW = sum_t X_t^T dz_t, one product over the stacked
    iterations for the hidden inputs, and for a clamped input (the same every iteration)
    its rows times sum_t dz_t."""
    xp, n_layers = xp_of(work.dW[l]), len(cfg.layer_sizes) - 1
    n_below, n_above, n_out = layer_shapes(cfg.layer_sizes)[l]
    dz, dz_sum, dW = work.dz[l], work.dz_sum[l], work.dW[l]
    rows = hidden_rows(l, n_layers, n_below, n_above)
    xp.sum(dz, axis=0, out=dz_sum)
    if rows.stop > rows.start:
        inputs = work.inputs[l]
        _, db = layer_grads(inputs.reshape(-1, inputs.shape[2]), dz.reshape(-1, n_out),
                            dW[rows])
    else:
        db = dz_sum.sum(axis=0)
    if l == 0:
        xp.matmul(work.image.T, dz_sum, out=dW[:n_below])
    if l == n_layers - 1:
        xp.matmul(work.label.T, dz_sum, out=dW[n_below:])
    return dW, db


def recurrent_step(state, x, cfg, lr, buffers):
    """One step on the batch x (positives, then negatives): the dynamics for
    cfg.n_iterations iterations; at each, every layer's FF loss on the goodness of its state
    h^t and its dL/dz, the states of t-1 held constant; then per layer one optimiser step
    on the gradients summed over the iterations. Yields (l, loss, g) per layer: the loss and
    the goodness per row averaged over the iterations."""
    work, g_sum = buffers
    n_layers, T, B = len(state.weights), cfg.n_iterations, cfg.batch_size
    losses = [0.0] * n_layers
    for t, l in run_dynamics(state.weights, state.biases, x, cfg, work, T):
        h = work.h[l]
        loss, g = ff_loss_and_dz(h, B, cfg.layer_threshold(h.shape[1]), cfg.goodness,
                                 work.dz[l][t - 1])
        damped_dz(work.dz[l][t - 1], work.new[l], cfg.damping, work.mask[l])
        losses[l] += loss
        if t == 1:
            g_sum[l] = g
        else:
            g_sum[l] += g
    for l, (W, b) in enumerate(zip(state.weights, state.biases)):
        dW, db = recurrent_grads(work, l, cfg)
        state.opt_w[l].step(W, dW, lr)
        state.opt_b[l].step(b, db, lr)
        yield l, losses[l] / T, g_sum[l] / T


# -----------------------------------------------------------------------------
# The read-out: each label clamped in turn, goodness over iterations 3-5

def goodness_per_label(weights, biases, x, cfg, chunk=100):
    """(n, 10) float64: each digit run with each label clamped, the goodness of every hidden
    layer summed over iterations cfg.readout_first..cfg.readout_last (the dynamics stop
    there: later iterations cannot change it). The ten labels of `chunk` digits run as
    one batch."""
    xp = xp_of(*weights)
    n_pixels = cfg.layer_sizes[0]
    scores = xp.zeros((len(x), N_CLASSES))
    work = batch = None
    for start in range(0, len(x), chunk):
        digits = xp.asarray(x[start:start + chunk])
        rows = len(digits) * N_CLASSES
        if batch is None or len(batch) != rows:  # the first chunk, and a shorter last one
            work = RecurrentWork.allocate(cfg.layer_sizes, rows, 2, xp)
            batch = xp.empty((rows, n_pixels + N_CLASSES), np.float32)
            one_hot(xp.tile(xp.arange(N_CLASSES), len(digits)), out=batch[:, n_pixels:])
        batch[:, :n_pixels] = xp.repeat(digits, N_CLASSES, axis=0)
        flat = scores[start:start + len(digits)].reshape(rows)  # row i * 10 + k: label k
        for t, l in run_dynamics(weights, biases, batch, cfg, work, cfg.readout_last):
            if t >= cfg.readout_first:
                flat += goodness(work.h[l], cfg.goodness)
    return scores


def goodness_error_rate(weights, biases, x, y, cfg):
    """Error of predicting the label with the highest goodness (goodness_per_label)."""
    scores = goodness_per_label(weights, biases, x, cfg)
    xp = xp_of(scores)
    return float(xp.mean(xp.argmax(scores, axis=1) != xp.asarray(y)))


def recurrent_read_outs(state, cfg, splits, log=print):
    """The paper's read-out on each (name, x, y) of splits, as metrics."""
    metrics, t0 = {}, time.perf_counter()
    for name, xs, ys in splits:
        metrics[f"goodness_{name}_error"] = goodness_error_rate(state.weights, state.biases,
                                                                xs, ys, cfg)
    metrics["goodness_seconds"] = time.perf_counter() - t0
    log("goodness read-out (iterations "
        f"{cfg.readout_first}-{cfg.readout_last}): " + "  ".join(
            f"{name} error {100 * metrics[f'goodness_{name}_error']:.2f}%"
            for name, _, _ in splits), flush=True)
    return metrics


# -----------------------------------------------------------------------------
# The configuration: the base one, the recurrent fields and the seams

def below_one(value):
    if value >= 1:
        raise ValueError(f"--damping {value} must be below 1: the state would never change")


FEED_FORWARD = "a feed-forward script (ff_hybrid_mnist.py, ff_label_mnist.py, ff_local_mnist.py)"


@dataclass
class RecurrentConfig(FFConfig):
    """Forward-Forward in a recurrent network with top-down connections (Hinton 2022, section 4)."""
    SCRIPT = "ff_recurrent_mnist.py"
    negatives = "label"
    ACCURACY_KEY, ACCURACY_NAME = "pos_vs_neg_accuracy", "right-vs-wrong-label"

    layer_sizes: tuple = option((784, 500, 500), "the image, then the hidden layers (the 10 "
                                "label units on top are added), comma-separated; the paper's: "
                                "784,2000,2000 or 784,2000,2000,2000",
                                metavar="N,N,...", default_text="784,500,500")
    lr: float = option(0.01, "step size of the FF layers (chosen on validation among 0.003, "
                       "0.01, 0.03: docs/recurrent.md)", low=0, above=True)
    softmax_epochs: int = option(0, "must be 0: the recurrent network is read out by its "
                                 "goodness, and has no softmax head", low=0)
    damping: float = option(0.3, "share of a hidden layer's previous state kept at each "
                            "iteration: new state = damping x old + (1 - damping) x computed "
                            "(the paper's 0.3)", low=0, check=below_one)
    n_iterations: int = option(8, "synchronous iterations after the bottom-up pass, in "
                               "training (a loss at each) (the paper's 8)", low=1)
    hard_negatives: bool = option(False, "each digit's wrong label drawn in proportion to "
                                  "the network's preference (the paper's): probability "
                                  "softmax of the top layer's FF logit after the first "
                                  "iteration with that label, over the nine wrong labels; "
                                  "without it, uniformly")
    readout_first: int = option(3, "the goodness read-out sums the iterations from this one "
                                "(the paper's 3)", low=1)
    readout_last: int = option(5, "... to this one (the paper's 5); the read-out runs this "
                               "many iterations", low=1)

    def rules(self):
        return [rule for rule in super().rules() if rule[0] != "top_k"] + [
            ("softmax_epochs", self.softmax_epochs > 0, "must be 0: the recurrent network "
             "is read out by its goodness (a softmax head reads a feed-forward pass)"),
            ("schedule", self.schedule != "parallel", "is for " + FEED_FORWARD + ": every "
             "recurrent layer learns at every step"),
            ("readout_last", self.readout_last > self.n_iterations,
             f"exceeds --n-iterations {self.n_iterations}"),
            ("readout_first", self.readout_first > self.readout_last,
             f"exceeds --readout-last {self.readout_last}"),
            ("n_blur", self.n_blur != self.__dataclass_fields__["n_blur"].default,
             "is unused: label negatives have no mask (ff_hybrid_mnist.py's hybrids have)"),
            ("peer_norm", self.peer_norm > 0, "is not implemented for the recurrent network; "
             "it is in " + FEED_FORWARD)]

    def unused_fields(self):
        unused = super().unused_fields()
        for name in ("softmax_epochs", "top_k", "head", "softmax_lr", "softmax_weight_decay"):
            unused[name] = "a softmax head, in " + FEED_FORWARD
        for name in ("schedule", "refresh_inputs", "peer_norm", "peer_kind"):
            unused[name] = FEED_FORWARD
        unused["n_blur"] = "ff_hybrid_mnist.py (a hybrid's mask)"
        return unused

    batch_width = property(lambda self: self.layer_sizes[0] + N_CLASSES)  # image | label

    def batches(self, x_train, y_train, state, x):
        return recurrent_batches(x_train, y_train, self, state, x)

    def fresh_network(self, rng):
        """Weights as init_weights draws them, for the fan-in of both inputs; biases 0."""
        weights = [init_weights(n_below + n_above, n_out, rng, self.init).astype(np.float32)
                   for n_below, n_above, n_out in layer_shapes(self.layer_sizes)]
        return weights, [np.zeros(W.shape[1], np.float32) for W in weights]

    def step_buffers(self, xp):
        return recurrent_buffers(self, xp)

    def step(self, state, x, lr, trained, n_active, buffers):
        return recurrent_step(state, x, self, lr, buffers)

    def read_outs(self, state, splits, log=print):
        return recurrent_read_outs(state, self, splits, log)


def main(argv=None):
    return ff_runs.main(RecurrentConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
