"""Forward-Forward with hybrid-image MNIST negatives (Hinton 2022, section 3.2).

Each layer of a ReLU MLP is trained on its own objective: make the goodness (mean of
squared activities) of real digits high and that of hybrid images low. A hybrid mixes two
digits through a smooth random mask, so it keeps the short-range statistics of real digits
and destroys their long-range shape. After this unsupervised training the network is frozen
and a linear softmax on the normalised activities of the top layers is fitted to the labels.

The file reads in the order the data flows: loader, hybrid negatives, layer maths, optimisers,
the training loop, the softmax head, the configuration (FFConfig, also the command line),
main(). The paper's other experiments are scripts beside it that hand the one training loop
their own batches, layer kind or read-out (ff_label_mnist.py, ff_local_mnist.py,
ff_recurrent_mnist.py). Run folders, checkpoints and the command line are in ff_runs.py, the
device fast paths in ff_devices.py; every function takes its array module from its
arguments, so --device gpu runs the same code on CuPy arrays.

    python3 ff_hybrid_mnist.py                      # the SPEC run, seed 0
    python3 ff_hybrid_mnist.py --n-epochs 2 --n-train 5000 --softmax-epochs 5
"""

import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

if __name__ == "__main__":  # one module, however it was started: ff_runs imports it by name
    sys.modules.setdefault("ff_hybrid_mnist", sys.modules[__name__])

import ff_runs  # noqa: E402
from ff_devices import (adam_cpu, adam_kernel, adam_scratch, array_module,  # noqa: E402
                        move_state, row_squares, to_host, xp_of)
from ff_runs import (check_head_loss, check_loss, finish_epoch, head_fit_line,  # noqa: E402
                     head_progress_line, option, read_idx_files)


# -----------------------------------------------------------------------------
# MNIST: find, verify and read the four IDX files; the validation split

MNIST_FILES = {  # role -> (file name, SHA-256 of the decompressed file)
    "train_images": ("train-images-idx3-ubyte",
                     "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train_labels": ("train-labels-idx1-ubyte",
                     "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "test_images": ("t10k-images-idx3-ubyte",
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "test_labels": ("t10k-labels-idx1-ubyte",
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}

DataError = ff_runs.DataError  # what load_mnist raises
EMBEDDED_MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


def load_mnist(data_dir=None, files=MNIST_FILES, embedded_dir=EMBEDDED_MNIST_DIR):
    """(x_train, y_train, x_test, y_test): float32 images in [0, 1], shape (n, 784); int64 labels,
    from data_dir (--data-dir), else $MNIST_DIR, else the repository's data/mnist/, each file
    checked against its SHA-256. Nothing is downloaded."""
    arrays = read_idx_files(files, [(data_dir, "--data-dir"),
                                    (os.environ.get("MNIST_DIR"), "MNIST_DIR"),
                                    (embedded_dir, "the repository's data/mnist")])

    def images(a):
        return (a.reshape(len(a), -1).astype(np.float32) / np.float32(255.0))
    return (images(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
            images(arrays["test_images"]), arrays["test_labels"].astype(np.int64))


def split_validation(x_train, y_train, val_size, n_train=None):
    """(x_fit, y_fit, x_val, y_val): the last val_size training digits are the validation
    split, the same ones for every seed; FF and the head fit on the first n_train of the
    rest (all of it when n_train is None)."""
    n_pool = len(x_train) - val_size
    n_fit = n_pool if n_train is None else n_train
    if val_size < 0 or n_fit > n_pool:
        raise ValueError(f"{n_fit} training + {val_size} validation digits exceed the "
                         f"{len(x_train)} of the training set")
    return (x_train[:n_fit], y_train[:n_fit], x_train[n_pool:], y_train[n_pool:])


# -----------------------------------------------------------------------------
# Hybrid negatives: m*a + (1-m)*b with a smooth random binary mask m

def blur_matrix(n_blur, side=28):
    """B = P^n_blur, P one pass of the [1/4, 1/2, 1/4] kernel with edge padding: n_blur
    passes along rows and columns of a mask M are B M B^T, two small products."""
    P = np.zeros((side, side))
    for i in range(side):
        for j, w in ((i - 1, 0.25), (i, 0.5), (i + 1, 0.25)):
            P[i, min(max(j, 0), side - 1)] += w  # edge padding folds the outside tap inwards
    return np.linalg.matrix_power(P, n_blur)


def mask_bits(n, rng, side=28):
    """The random bits of n masks, packed (uint8), drawn from the host generator, so that a
    seed draws the same masks on every device."""
    return np.frombuffer(rng.bytes(-(-n * side * side // 8)), np.uint8)


@functools.lru_cache(maxsize=16)
def blur_matrix_on(xp, n_blur, side, dtype):
    """blur_matrix in xp's memory, made once (read only)."""
    return xp.asarray(blur_matrix(n_blur, side).astype(dtype))


def make_masks(n, rng, n_blur=6, side=28, xp=np, bits=None):
    """n boolean masks (n, side*side) in xp's memory: uniform random bits (bits: packed, from
    mask_bits, else drawn), blurred n_blur times, > 0.5. The blurred values are multiples of
    4^-(2 n_blur), exact in float32 up to n_blur = 6 (float64 up to 13): the threshold sees
    the exact blur in any summation order, on any device."""
    dtype = np.float32 if n_blur <= 6 else np.float64
    B = blur_matrix_on(xp, n_blur, side, dtype)
    bits = xp.asarray(mask_bits(n, rng, side)) if bits is None else bits
    bits = xp.unpackbits(bits)[:n * side * side].reshape(n * side, side).astype(dtype)
    rows_blurred = (bits @ B.T).reshape(n, side, side)                 # M B^T
    blurred = rows_blurred.transpose(0, 2, 1).reshape(n * side, side) @ B.T  # (B M B^T)^T
    return (blurred.reshape(n, side, side).transpose(0, 2, 1) > 0.5).reshape(n, side * side)


def make_hybrid_batch(a, b, rng, n_blur=6, out=None, bits=None):
    """Hybrids of image rows a and b, one fresh mask per pair; returns (hybrids, masks).
    bits: the masks' packed bits, drawn already (mask_bits) in a's memory, else drawn."""
    xp = xp_of(a)
    masks = make_masks(len(a), rng, n_blur, xp=xp, bits=bits)
    out = xp.empty_like(a) if out is None else out
    xp.copyto(out, b)
    xp.copyto(out, a, where=masks)
    return out, masks


# -----------------------------------------------------------------------------
# Layer maths: normalisation, forward, goodness, the FF loss's hand-derived gradient, peers

def l2_normalize(x, out=None, eps=1e-8):
    """Rows scaled to unit length, so a layer sees only the direction of the layer below."""
    xp = xp_of(x)
    norm = xp.sqrt(row_squares(x))
    norm += eps
    return xp.divide(x, norm[:, None], out=out)


def rms_normalize(x, out=None, eps=1e-8):
    """Rows scaled to a mean square of 1 per component (the author's Matlab code): the
    direction of l2_normalize, sqrt(n_components) times longer."""
    xp = xp_of(x)
    rms = xp.sqrt(row_squares(x) / x.shape[1])
    rms += eps
    return xp.divide(x, rms[:, None], out=out)


NORMALIZE = {"l2": l2_normalize, "rms": rms_normalize}


def layer_forward(x_normed, W, b, out=None, kind=None, fields=None):
    """h = ReLU(x W + b) for normalised rows x. kind: None for a dense layer, else the
    layer's kind, whose product(x, W, out, fields) computes x W (a locally-connected layer's,
    ff_local_mnist.py, gathering its receptive fields into fields)."""
    xp = xp_of(x_normed, W)
    h = (xp.matmul(x_normed, W, out=out) if kind is None
         else kind.product(x_normed, W, out, fields))
    h += b
    return xp.maximum(h, 0, out=h)


def goodness(h, kind="mean"):
    """Mean (the SPEC) or sum of squared activities per row."""
    g = row_squares(h)
    return g / h.shape[1] if kind == "mean" else g


def sigmoid(t):
    return 0.5 * (1.0 + xp_of(t).tanh(0.5 * t))  # no overflow for any t


def ff_loss_and_dz(h, n_pos, threshold, goodness_kind, dz):
    """The paper's loss of one layer and its gradient with respect to z = x W + b, into dz.

    Rows of h are the layer's activities, the n_pos positives first, then as many
    negatives. With s = -1 for a positive and +1 for a negative,
        L = (1/n_pos) sum_rows softplus(s (g - threshold))
    so dL/dg = s sigmoid(s (g - threshold)) / n_pos, dg/dh = 2h/n_units (mean) or 2h (sum),
    and dh/dz = [z > 0], which h carries already (h = 0 wherever z <= 0). Returns loss, g.
    """
    xp = xp_of(h)
    g = goodness(h, goodness_kind)
    margin = g - threshold
    xp.negative(margin[:n_pos], out=margin[:n_pos])  # in place: `*= -1` on a slice copies
    loss = xp.logaddexp(0.0, margin).sum() / n_pos
    dloss_dg = sigmoid(margin) / n_pos
    xp.negative(dloss_dg[:n_pos], out=dloss_dg[:n_pos])
    scale = 2.0 / h.shape[1] if goodness_kind == "mean" else 2.0
    xp.multiply(h, (scale * dloss_dg)[:, None].astype(h.dtype, copy=False), out=dz)
    return loss, g


PEER_MOMENTUM = 0.9  # both kinds of peer normalisation: r = 0.9 r + 0.1 (batch mean)


def peer_spread(h, n_pos, peer_mean, coef, dz):
    """Peer normalisation as a loss (this suite's): r = 0.9 peer_mean + 0.1 * mean activity of
    each unit over the positives, and L = coef * mean_j (r_j - mean(r))^2, which pulls every
    unit's running mean activity towards the layer's mean. Its gradient passes through the
    ReLU, so a unit that is never on gets none. Adds dL/dz to dz; returns (L, r)."""
    xp = xp_of(h)
    r = PEER_MOMENTUM * peer_mean + (1 - PEER_MOMENTUM) * h[:n_pos].mean(axis=0)
    deviation = r - r.mean()
    # d/dr_j mean_k (r_k - mean r)^2 = 2 (r_j - mean r) / n_units (the deviations sum to 0)
    dactivity = coef * (1 - PEER_MOMENTUM) * 2.0 / h.shape[1] * deviation / n_pos
    dz[:n_pos] += (h[:n_pos] > 0) * dactivity.astype(h.dtype, copy=False)
    return coef * xp.mean(deviation ** 2), r


def peer_author(h, n_pos, peer_mean, coef, dz):
    """Peer normalisation as the author's Matlab code does it: r = 0.9 peer_mean + 0.1 * mean
    activity over the positives (r starts at 0.5), and every positive row's dL/dz gets
    coef (r_j - mean(r)) / n_pos, not gated by the ReLU, so a silent unit is pushed back on.
    With r held fixed this is the gradient of coef/n_pos * sum_pos sum_j (r_j - mean r) z_j,
    a term linear in z; it is left out of the reported loss. Returns (0, r)."""
    r = PEER_MOMENTUM * peer_mean + (1 - PEER_MOMENTUM) * h[:n_pos].mean(axis=0)
    dz[:n_pos] += (coef / n_pos * (r - r.mean())).astype(h.dtype, copy=False)
    return 0.0, r


PEER = {"spread": peer_spread, "author": peer_author}


def layer_grads(x_normed, dz, dW, kind=None, fields=None):
    """dL/dW = x^T dL/dz into dW, and dL/db. A layer of another kind computes its own dW
    (kind.weight_grad, from the fields its forward pass gathered, or gathered again)."""
    if kind is None:
        xp_of(x_normed, dz).matmul(x_normed.T, dz, out=dW)
    else:
        kind.weight_grad(x_normed, dz, dW, fields)
    return dW, dz.sum(axis=0)


@dataclass
class LayerWork:
    """Buffers reused by every step of one layer: activities, dL/dz and dL/dW (and a
    locally-connected layer's receptive fields of its input, gathered by the forward pass)."""
    h: np.ndarray
    dz: np.ndarray
    dW: np.ndarray
    fields: np.ndarray = None

    @classmethod
    def allocate(cls, n_rows, n_in, n_out, xp=np, kind=None):
        W_shape = (n_in, n_out) if kind is None else kind.weight_shape(n_out)
        fields = None if kind is None else kind.fields_buffer(n_rows, xp)
        return cls(xp.empty((n_rows, n_out), np.float32), xp.empty((n_rows, n_out), np.float32),
                   xp.empty(W_shape, np.float32), fields)


INITS = ("sqrt2", "fan-in")


def init_weights(n_in, n_out, rng, init="sqrt2"):
    """One dense layer's weights as init_network draws them (float64)."""
    return rng.standard_normal((n_in, n_out)) * (np.sqrt(2.0) if init == "sqrt2"
                                                 else 1 / np.sqrt(n_in))


def init_network(layer_sizes, rng, kinds=None, init="sqrt2"):
    """Biases 0; weights N(0, sqrt 2) (sqrt2: a unit-norm input gives z ~ N(0, 2), a mean
    goodness near 1, below the threshold 2, where the loss is not flat) or N(0, 1/sqrt(n_in))
    (fan-in, the author's, for RMS-normalised inputs). A layer of another kind (kinds) makes
    its weights from the dense draw (kind.from_dense)."""
    weights, biases = [], []
    kinds = kinds or [None] * (len(layer_sizes) - 1)
    for n_in, n_out, kind in zip(layer_sizes[:-1], layer_sizes[1:], kinds):
        W = init_weights(n_in, n_out, rng, init)
        if kind is not None:
            W = kind.from_dense(W)
        weights.append(W.astype(np.float32))
        biases.append(np.zeros(n_out, np.float32))
    return weights, biases


def network_activities(weights, biases, x, n_layers=None, norm="l2", kinds=None):
    """Activities h of each layer (or the first n_layers) for raw input rows x, each layer's
    input normalised by NORMALIZE[norm], computed where the weights live (host rows are
    copied there). kinds: the layers' kinds (cfg.layer_kinds()), None for dense layers."""
    xp = xp_of(x, *weights)
    if kinds is None and any(W.ndim != 2 for W in weights):
        raise ValueError("weights that are not dense matrices need their layer kinds "
                         "(kinds=cfg.layer_kinds())")
    x = xp.asarray(x)
    hs = []
    for W, b, kind in list(zip(weights, biases, kinds or [None] * len(weights)))[:n_layers]:
        x = layer_forward(NORMALIZE[norm](x), W, b, kind=kind)
        hs.append(x)
    return hs


# -----------------------------------------------------------------------------
# Optimisers, in place (how Adam's passes run on each device: ff_devices.py)

class Adam:
    """Adam (Kingma & Ba 2015) with decoupled weight decay (AdamW: p *= 1 - lr weight_decay
    before the step; decay added to the gradient would be divided by sqrt(v_hat) too and
    silenced every unit), in place. It keeps m_acc = m / (1 - beta1), v_acc = v / (1 - beta2)
    of the textbook, so a step is ten elementwise passes and no temporaries:
        p -= step_size * m_acc / (sqrt(v_acc) + eps / k),  k = sqrt((1-beta2)/(1-beta2^t)),
    step_size = lr (1-beta1) / ((1-beta1^t) k)."""

    def __init__(self, param, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m_acc = xp_of(param).zeros_like(param)
        self.v_acc = xp_of(param).zeros_like(param)
        self.t = 0
        self.scratch = None  # the CPU passes' buffers, made on the first CPU step

    def step(self, param, grad, lr):
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        # Python floats: a numpy float64 scalar would make every float32 pass float64
        k = math.sqrt((1 - b2) / (1 - b2 ** self.t))
        step_size = float(lr) * (1 - b1) / ((1 - b1 ** self.t) * k)
        decay = 1.0 - float(lr) * self.weight_decay
        # moments without gradient decay into float32 subnormals, ~100x slower on x86;
        # below 1e-30 they move a weight by < 1e-24, so every 16 steps they are zeroed
        flush_below = 1e-30 if self.t % 16 == 0 else 0.0
        scalars = (decay, b1, b2, step_size, self.eps / k, flush_below)
        if xp_of(param) is np:
            if self.scratch is None:
                self.scratch = adam_scratch(param)
            adam_cpu(param, grad, self.m_acc, self.v_acc, *scalars, self.scratch)
        else:
            adam_kernel()(grad, *scalars, param, self.m_acc, self.v_acc)

    def state_arrays(self):
        return {"m": self.m_acc, "v": self.v_acc, "t": self.t}

    def load_state(self, m, v, t):
        self.m_acc[...], self.v_acc[...], self.t = m, v, int(t)


class SmoothedSGD:
    """The author's optimiser (his Matlab code), in place: g = delay g + (1 - delay) grad,
    p -= lr (g + weight_decay p), the weight cost unsmoothed; `grad` is the scratch."""

    def __init__(self, param, delay=0.9, weight_decay=0.0):
        self.delay, self.weight_decay = delay, weight_decay
        self.g = xp_of(param).zeros_like(param)

    def step(self, param, grad, lr):
        grad *= 1.0 - self.delay
        self.g *= self.delay
        self.g += grad
        if self.weight_decay:
            param *= 1.0 - float(lr) * self.weight_decay
        xp_of(param).multiply(self.g, float(lr), out=grad)
        param -= grad

    def state_arrays(self):
        return {"g": self.g}

    def load_state(self, g):
        self.g[...] = g


OPTIMIZERS = {"adam": Adam, "sgd": SmoothedSGD}


# -----------------------------------------------------------------------------
# The training loop: every layer, every batch, B positives and B fresh negatives

def hybrid_batches(x_train, y_train, cfg, state, x):
    """One epoch of batches: x[:B] real digits, x[B:] hybrids of two other random digits
    (two independent shuffles, a fresh mask per pair). Yields after filling x."""
    n, B, rng, xp = len(x_train), cfg.batch_size, state.rng, xp_of(x_train)
    pos, pa, pb = rng.permutation(n), rng.permutation(n), rng.permutation(n)
    # the mask bits of every batch drawn now, in batch order, and moved to the device at once
    bits = xp.asarray(np.stack([mask_bits(B, rng) for _ in range(n // B)]))
    pos, pa, pb = xp.asarray(np.stack([pos, pa, pb]))
    for i in range(n // B):
        batch = slice(i * B, (i + 1) * B)
        x[:B] = x_train[pos[batch]]
        make_hybrid_batch(x_train[pa[batch]], x_train[pb[batch]], rng, cfg.n_blur, out=x[B:],
                          bits=bits[i])
        yield


def train_layer_step(state, l, x_in, cfg, lr, work, learns=True, refresh=False, kind=None):
    """Layer l's part of one step on x_in, the normalised batch (positives, then negatives):
    forward, FF loss and gradient, the optimiser, the peer-norm mean; a frozen layer (greedy)
    only runs forward. Returns (loss, g, h): loss NaN when frozen; h, what the layer above
    sees, is the output from before the update unless refresh."""
    W, b = state.weights[l], state.biases[l]
    if not learns:
        h = layer_forward(x_in, W, b, out=work.h, kind=kind, fields=work.fields)
        return np.nan, goodness(h, cfg.goodness), h
    h = layer_forward(x_in, W, b, out=work.h, kind=kind, fields=work.fields)
    loss, g = ff_loss_and_dz(h, cfg.batch_size, cfg.layer_threshold(h.shape[1]), cfg.goodness,
                             work.dz)
    if cfg.peer_norm > 0:
        peer_loss, state.peer_means[l][...] = PEER[cfg.peer_kind](
            h, cfg.batch_size, state.peer_means[l], cfg.peer_norm, work.dz)
        loss += peer_loss
    dW, db = layer_grads(x_in, work.dz, work.dW, kind, work.fields)
    state.opt_w[l].step(W, dW, lr)
    state.opt_b[l].step(b, db, lr)
    if refresh:
        h = layer_forward(x_in, W, b, out=work.h, kind=kind, fields=work.fields)
    return loss, g, h


def stack_buffers(cfg, xp):
    """What stack_step reuses: each layer's normalised input, its LayerWork, its kind."""
    rows, kinds = 2 * cfg.batch_size, cfg.layer_kinds()
    inputs = [xp.empty((rows, size), np.float32) for size in cfg.layer_sizes[:-1]]
    work = [LayerWork.allocate(rows, n_in, n_out, xp, kind)
            for n_in, n_out, kind in zip(cfg.layer_sizes[:-1], cfg.layer_sizes[1:], kinds)]
    return inputs, work, kinds


def stack_step(state, x, cfg, lr, trained, n_active, buffers):
    """One step of the layer stack on the batch x (positives, then negatives): yields (l,
    loss, g) for each of the n_active layers in turn. Every layer sees the normalised
    activities that the layer below had before its own update of this step (one forward
    pass serves forward and gradient), unless cfg.refresh_inputs."""
    inputs, work, kinds = buffers
    normalize = NORMALIZE[cfg.normalize]
    normalize(x, out=inputs[0])
    for l in range(n_active):
        loss, g, h = train_layer_step(state, l, inputs[l], cfg, lr, work[l], l in trained,
                                      refresh=cfg.refresh_inputs and l + 1 < n_active,
                                      kind=kinds[l])
        yield l, loss, g
        if l + 1 < n_active:
            normalize(h, out=inputs[l + 1])


def train_ff(x_train, cfg, state, callback=None, log=print, y_train=None):
    """Train state in place up to total_epochs(cfg): the batches of cfg.batches, each a step
    of cfg.step (the layer stack's: stack_step); callback(epoch, state) after each epoch."""
    xp = array_module(cfg.device)
    state.to(xp)
    x_train = xp.asarray(x_train)  # once per run; the batches are gathered where they train
    B, n_layers, epochs = cfg.batch_size, len(cfg.layer_sizes) - 1, total_epochs(cfg)
    n_batches = len(x_train) // B
    x = xp.empty((2 * B, cfg.batch_width), np.float32)  # positives, then negatives
    buffers = cfg.step_buffers(xp)
    t_start, start_epoch = time.perf_counter(), state.epochs_done
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        trained = range(n_layers) if cfg.schedule == "parallel" else [epoch // cfg.n_epochs]
        n_active = max(trained) + 1  # greedy: the layers below the one that learns run too
        # each step's loss and goodness per layer, kept where they are made and read once
        losses = xp.full((n_batches, n_layers), np.nan)
        goodnesses = xp.zeros((n_batches, n_layers, 2 * B), np.float32)
        for i, _ in enumerate(cfg.batches(x_train, y_train, state, x)):
            # a greedy stage decays the rate over its own epochs
            lr = learning_rate(cfg, epoch % cfg.n_epochs, i / n_batches)
            for l, loss, g in cfg.step(state, x, lr, trained, n_active, buffers):
                if l in trained and xp is np:
                    check_loss(cfg, loss, epoch, l, i)
                losses[i, l], goodnesses[i, l] = loss, g
        # the GPU's one wait of the epoch: the sums checked, recorded and shown
        finish_epoch(cfg, state, to_host(losses), to_host(goodnesses), trained, n_active,
                     epoch, (t0, t_start, start_epoch), log)
        if callback is not None:
            callback(epoch, state)
    return state


# -----------------------------------------------------------------------------
# Softmax head on the frozen network

def extract_features(weights, biases, x, top_k, chunk=2000, norm="l2", kinds=None):
    """concat(normalised h_l) over the top_k layers, float32, computed chunk by chunk; each
    layer's input and each feature block normalised by NORMALIZE[norm]."""
    sizes = [len(b) for b in biases[-top_k:]]
    features = xp_of(*weights).empty((len(x), sum(sizes)), np.float32)
    for start in range(0, len(x), chunk):
        hs = network_activities(weights, biases, x[start:start + chunk], norm=norm, kinds=kinds)
        rows = features[start:start + chunk]
        col = 0
        for h in hs[-top_k:]:
            NORMALIZE[norm](h, out=rows[:, col:col + h.shape[1]])
            col += h.shape[1]
    return features


def softmax_loss_and_grads(F, y, W, b, weight_decay=0.0):
    """Mean cross-entropy of softmax(F W + b) plus (weight_decay/2)||W||^2, and its gradient.

    dL/dlogits = (softmax - onehot) / n; returns loss, dW, db, logits.
    """
    xp = xp_of(F, W)
    logits = F @ W
    logits += b
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(shifted)
    p_sum = p.sum(axis=1)
    rows, y = xp.arange(len(y)), xp.asarray(y)
    loss = (xp.log(p_sum).mean() - shifted[rows, y].mean()
            + 0.5 * weight_decay * xp.vdot(W, W))
    p /= p_sum[:, None]
    p[rows, y] -= 1
    p /= len(y)
    dW = F.T @ p
    dW += weight_decay * W
    return loss, dW, p.sum(axis=0), logits


def error_rate(F, y, W, b, chunk=10000):
    xp = xp_of(F, W)
    y = xp.asarray(y)
    wrong = sum(int(xp.sum(xp.argmax(F[s:s + chunk] @ W + b, axis=1) != y[s:s + chunk]))
                for s in range(0, len(y), chunk))
    return wrong / len(y)


def train_softmax(F_train, y_train, rng, n_epochs, lr, weight_decay, batch_size=256,
                  n_classes=10, log=print, F_val=None, y_val=None):
    """Minibatch SGD on the linear softmax (the reference write-up's head), where F_train
    lives. Per epoch: the loss and running error of its minibatches and the validation error
    (given F_val); the test set is not read. A loss that is not finite raises
    TrainingDiverged (on a GPU at the end of the epoch, where its sums are read back once)."""
    xp = xp_of(F_train)
    W, b = xp.zeros((F_train.shape[1], n_classes), np.float32), xp.zeros(n_classes, np.float32)
    hist = {"train_error": [], "loss": [], "seconds": []} | (
        {} if F_val is None else {"val_error": []})
    n, labels = len(y_train), xp.asarray(y_train)
    for epoch in range(n_epochs):
        t0 = time.perf_counter()
        perm = xp.asarray(rng.permutation(n))
        wrong, loss_sum = 0, 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            yb = labels[idx]
            # a diverging head overflows on its way to inf; the check below reports it
            with np.errstate(over="ignore", invalid="ignore"):
                loss, dW, db, logits = softmax_loss_and_grads(F_train[idx], yb, W, b,
                                                              weight_decay)
            if xp is np and not np.isfinite(loss):
                check_head_loss(loss, epoch, lr, weight_decay)
            W -= lr * dW
            b -= lr * db
            wrong += (logits.argmax(axis=1) != yb).sum()
            loss_sum += loss.astype(np.float64) * len(idx)  # float64, as float(loss) was
        wrong, loss_sum = int(wrong), float(loss_sum)  # the epoch's one read of the two
        check_head_loss(loss_sum / n, epoch, lr, weight_decay)
        hist["train_error"].append(wrong / n)
        hist["loss"].append(loss_sum / n)
        if F_val is not None:
            hist["val_error"].append(error_rate(F_val, y_val, W, b))
        hist["seconds"].append(time.perf_counter() - t0)
        if (epoch + 1) % 5 == 0 or epoch + 1 == n_epochs:
            log(head_progress_line(hist, epoch, n_epochs), flush=True)
    return W, b, hist


HEAD_C = (0.1, 1.0, 10.0, 100.0, 1000.0)  # the penalty |W|^2 / 2C on the summed cross-entropy, C among
HEAD_GTOL = 1e-6       # converged: no gradient component of the penalised mean loss above this
HEAD_MAX_ITER = 3000   # L-BFGS iterations a fit may take (a fit that stops here says so)
HEAD_CHOICE_SIZE = 10000  # no validation split: C is chosen on the last this many fit digits


def fit_softmax_converged(F, y, weight_decay, start=None, F_val=None, y_val=None,
                          n_classes=10, gtol=HEAD_GTOL, max_iter=HEAD_MAX_ITER):
    """The linear softmax at the optimum of softmax_loss_and_grads (convex: unique) by
    full-batch L-BFGS from start = (W, b) or zeros, until no gradient component exceeds gtol
    or after max_iter iterations (history["converged"]). Where float32 rounding stops the
    line search first, the fit goes on in float64. History: per iteration the loss, the
    training error and (given F_val) the validation error."""
    from scipy.optimize import minimize  # the head's optimiser; FF training does not need it

    xp = xp_of(F)
    n_weights = F.shape[1] * n_classes
    labels = xp.asarray(y)
    hist = {"loss": [], "train_error": []} | ({} if F_val is None else {"val_error": []})

    def unpack(theta, dtype):
        return (xp.asarray(theta[:n_weights].reshape(-1, n_classes), dtype=dtype),
                xp.asarray(theta[n_weights:], dtype=dtype))

    def fit(data, theta, max_iter):
        last = {}

        def loss_and_grad(theta):
            W, b = unpack(theta, data.dtype)
            with np.errstate(over="ignore", invalid="ignore"):
                loss, dW, db, logits = softmax_loss_and_grads(data, labels, W, b, weight_decay)
            last.update(theta=theta, logits=logits)
            return float(loss), np.concatenate([to_host(dW).ravel(), to_host(db)]).astype(
                np.float64)

        def callback(intermediate_result):
            theta = intermediate_result.x
            if not np.array_equal(last["theta"], theta):
                loss_and_grad(theta)  # the iterate is not the last point evaluated
            hist["loss"].append(float(intermediate_result.fun))
            hist["train_error"].append(float((last["logits"].argmax(axis=1) != labels).mean()))
            if F_val is not None:
                hist["val_error"].append(error_rate(F_val, y_val, *unpack(theta, F.dtype)))
        return minimize(loss_and_grad, theta, jac=True, method="L-BFGS-B", callback=callback,
                        options={"maxiter": max_iter, "gtol": gtol, "ftol": 0.0, "maxcor": 20})

    theta = np.zeros(n_weights + n_classes)
    if start is not None:
        theta[:n_weights], theta[n_weights:] = to_host(start[0]).ravel(), to_host(start[1])
    result = fit(F, theta, max_iter)
    iterations, float64_iterations = int(result.nit), 0
    if np.abs(result.jac).max() > gtol and F.dtype != np.float64 and iterations < max_iter:
        result = fit(F.astype(np.float64), result.x, max_iter - iterations)
        float64_iterations = int(result.nit)
    grad_max = float(np.abs(result.jac).max())
    hist.update(grad_max=grad_max, converged=grad_max <= gtol,
                iterations=iterations + float64_iterations,
                float64_iterations=float64_iterations, message=str(result.message),
                weight_decay=weight_decay)
    W, b = unpack(result.x, F.dtype)
    return W, b, hist


def fit_head_converged(F_fit, y_fit, F_val=None, y_val=None, strengths=HEAD_C, log=print,
                       n_classes=10):
    """The converged read-out: a converged head for each C (weight decay 1 / (C n) on the mean
    loss), the strongest penalty first, each from the previous optimum; the C with the least
    validation error is kept (ties: the stronger). Without a validation split, C is chosen on
    the last HEAD_CHOICE_SIZE fit digits and then refitted on all. Never reads the test set.
    Returns W, b and the history of every fit."""
    if F_val is None:
        n_choose = min(HEAD_CHOICE_SIZE, len(y_fit) // 2)
        cut = len(y_fit) - n_choose
        F_use, y_use, F_choose, y_choose = F_fit[:cut], y_fit[:cut], F_fit[cut:], y_fit[cut:]
        chosen_on = f"the last {n_choose} of the head's training digits"
    else:
        F_use, y_use, F_choose, y_choose = F_fit, y_fit, F_val, y_val
        chosen_on = "the validation split"
    start, best, fits = None, None, []
    for C in sorted(strengths):
        t0 = time.perf_counter()
        W, b, hist = fit_softmax_converged(F_use, y_use, 1 / (C * len(y_use)), start=start,
                                           F_val=F_choose, y_val=y_choose, n_classes=n_classes)
        hist.update(C=C, choice_error=error_rate(F_choose, y_choose, W, b),
                    seconds=time.perf_counter() - t0)
        fits.append(hist)
        log(head_fit_line(hist, chosen_on), flush=True)
        if best is None or hist["choice_error"] < best[0]:
            best = (hist["choice_error"], C, W, b)
        start = (W, b)
    _, C, W, b = best
    weight_decay = 1 / (C * len(y_use))
    if F_val is None:  # the chosen C on every fit digit
        t0 = time.perf_counter()
        weight_decay = 1 / (C * len(y_fit))
        W, b, hist = fit_softmax_converged(F_fit, y_fit, weight_decay, start=(W, b),
                                           n_classes=n_classes)
        hist.update(C=C, seconds=time.perf_counter() - t0, final=True)
        fits.append(hist)
    log(f"converged head: C {C:g} (weight decay {weight_decay:.3g}), chosen on {chosen_on}",
        flush=True)
    return W, b, {"kind": "lbfgs", "C": C, "weight_decay": weight_decay,
                  "chosen_on": chosen_on, "fits": fits}


def fit_head(weights, biases, cfg, fit, splits, log=print, strengths=HEAD_C):
    """The softmax head on the frozen network's cfg.top_k top layers, fitted on fit = (x, y)
    by fit_head_converged (cfg.head lbfgs) or train_softmax (sgd), and its error on each
    (name, x, y) of splits. Returns (W, b), the head's history and its metrics."""
    x_fit, y_fit = fit
    x_fit = cfg.head_input(x_fit)
    splits = [(name, cfg.head_input(x), y) for name, x, y in splits]
    t0 = time.perf_counter()
    features = lambda x: extract_features(weights, biases, x, cfg.top_k, norm=cfg.normalize,
                                          kinds=cfg.layer_kinds())
    F_fit = features(x_fit)
    F = {name: features(x) for name, x, _ in splits}
    y = {name: labels for name, _, labels in splits}
    feature_seconds = time.perf_counter() - t0
    metrics = {"head": cfg.head}
    if cfg.head == "sgd":
        W, b, history = train_softmax(F_fit, y_fit, np.random.default_rng([cfg.seed, 1]),
                                      cfg.softmax_epochs,
                                      cfg.softmax_lr, cfg.softmax_weight_decay, log=log,
                                      F_val=F.get("val"), y_val=y.get("val"))
    else:
        W, b, history = fit_head_converged(F_fit, y_fit, F.get("val"), y.get("val"),
                                           strengths, log=log)
        metrics.update(head_C=history["C"], head_weight_decay=history["weight_decay"],
                       head_converged=all(f["converged"] for f in history["fits"]),
                       head_iterations=sum(f["iterations"] for f in history["fits"]))
    metrics.update({f"{name}_error": error_rate(F[name], y[name], W, b) for name in F})
    metrics.update(train_error=error_rate(F_fit, y_fit, W, b),
                   softmax_seconds=time.perf_counter() - t0, feature_seconds=feature_seconds)
    return (W, b), history, metrics


# -----------------------------------------------------------------------------
# The run's configuration (also its command line) and state

GOODNESS_KINDS = ("mean", "sum")
SCHEDULES = ("parallel", "greedy")
LR_DECAYS = ("none", "linear-half", "linear-half-epochs")
DEVICES = ("cpu", "gpu")
HEADS = ("lbfgs", "sgd")
N_TRAIN_MAX, N_TEST, N_CLASSES = 60000, 10000, 10  # MNIST's training and test digits, labels


@dataclass
class FFConfig:
    """Forward-Forward with hybrid-image MNIST negatives (Hinton 2022, section 3.2).

    Everything a run depends on, checked on construction (ValueError, one line), and its
    command line. A variant script subclasses it: its fields, rules and the loop's seams."""
    SCRIPT = "ff_hybrid_mnist.py"
    negatives = "hybrid"  # what the batches hold besides the real digits
    ACCURACY_KEY, ACCURACY_NAME = "real_vs_hybrid_accuracy", "real-vs-hybrid"

    layer_sizes: tuple = option((784, 1000, 1000, 1000, 1000), "comma-separated, input first",
                                metavar="N,N,...", default_text="784,1000,1000,1000,1000")
    n_epochs: int = option(30, "FF epochs (per layer with --schedule greedy)", low=0)
    batch_size: int = option(100, "positives per batch (as many negatives are added)", low=1)
    lr: float = option(0.03, "step size of the FF layers", low=0, above=True)
    optimizer: str = option("adam", "adam; sgd: the author's smoothed-gradient SGD, g = 0.9 g + "
                            "0.1 grad, p -= lr (g + weight_decay p)", choices=("adam", "sgd"))
    weight_decay: float = option(0.0, "decoupled weight decay of the FF weights: each step "
                                 "multiplies them by 1 - lr * weight_decay", low=0)
    lr_decay: str = option("none", "linear-half: constant, then linearly to 0 over the second "
                           "half; linear-half-epochs: stepped once an epoch (the author's)",
                           choices=LR_DECAYS)
    threshold: float = option(2.0, "goodness threshold theta (per unit: --goodness sum uses "
                              "threshold * n_units)", low=0, above=True)
    goodness: str = option("mean", "mean or sum of squared activities; sum uses threshold * "
                           "n_units, so both agree on every input", choices=GOODNESS_KINDS)
    normalize: str = option("l2", "each layer's input and the head's features: l2, unit length; "
                            "rms, mean square 1 (the author's)", choices=tuple(NORMALIZE))
    init: str = option("sqrt2", "weights N(0, sqrt 2), or N(0, 1/sqrt(fan-in)) (the author's); "
                       "biases 0", choices=INITS)
    peer_norm: float = option(0.0, "peer-normalisation coefficient, 0 = off", low=0)
    peer_kind: str = option("spread", "with --peer-norm: spread, a loss on the spread of the "
                            "units' mean activities (gated by the ReLU); author, the author's "
                            "ungated term (peer_author)", choices=tuple(PEER))
    schedule: str = option("parallel", "parallel: every layer learns in every epoch; greedy: "
                           "layer 1 for --n-epochs, then layer 2, ...", choices=SCHEDULES)
    refresh_inputs: bool = option(False, "feed each layer the output of the updated layer "
                                  "below (a second forward pass per layer)")
    n_blur: int = option(6, "blur passes of the hybrid mask", low=0)
    top_k: int = option(3, "layers whose activities feed the softmax head", low=1)
    head: str = option("lbfgs", "the softmax head: lbfgs, fitted to its optimum, its penalty "
                       "chosen on validation among HEAD_C; sgd, minibatch SGD (the reference "
                       "write-up's)", choices=HEADS)
    softmax_epochs: int = option(50, "epochs of the SGD head; 0 skips the head (either kind)",
                                 low=0)
    softmax_lr: float = option(0.05, "with --head sgd: its step size", low=0, above=True)
    softmax_weight_decay: float = option(1e-4, "with --head sgd: its L2 penalty (wd/2)|W|^2",
                                         low=0)
    seed: int = option(0, "seeds the network, the batches, the negatives (the SGD head: "
                       "[seed, 1])", low=0)
    n_train: int = option(None, "use the first N training digits", low=1,
                          default_text="every digit not held out by --val-size")
    val_size: int = option(0, "hold out the last N training digits from FF and the head as the "
                           "validation split", low=0)
    device: str = option("cpu", "gpu: the same code on CuPy arrays; a resumed run may change "
                         "it", choices=DEVICES)

    def __post_init__(self):
        ff_runs.check_config(self, N_TRAIN_MAX)

    def derive(self):
        """Fields that follow from others (a variant's layer sizes), before the rules."""

    def rules(self):
        """(field, broken, why) for each rule that involves more than one field."""
        n_layers, default = len(self.layer_sizes) - 1, lambda name: getattr(
            self, name) == self.__dataclass_fields__[name].default
        return [("top_k", self.top_k > n_layers, f"exceeds the {n_layers} layers of --layer-sizes"),
                ("n_train", self.n_train + self.val_size > N_TRAIN_MAX, f"and --val-size "
                 f"{self.val_size} together exceed the {N_TRAIN_MAX} training digits"),
                ("batch_size", self.batch_size > self.n_train, f"exceeds --n-train {self.n_train}"),
                ("softmax_lr", not default("softmax_lr") and self.head != "sgd",
                 "needs --head sgd (the converged head has no step size)"),
                ("softmax_weight_decay", not default("softmax_weight_decay") and self.head != "sgd",
                 "needs --head sgd (the converged head chooses its penalty on validation)"),
                ("softmax_lr", not default("softmax_lr") and self.softmax_epochs == 0,
                 "is unused: --softmax-epochs 0 skips the head"),
                ("refresh_inputs", self.refresh_inputs and self.schedule == "greedy",
                 "does nothing with --schedule greedy (the layers below are frozen)"),
                ("weight_decay", self.lr * self.weight_decay >= 1, f"times --lr {self.lr:g} is "
                 "at least 1: each step would zero or flip the weights"),
                ("peer_kind", self.peer_kind != "spread" and self.peer_norm == 0,
                 "needs --peer-norm above 0")]

    def unused_fields(self):
        """{field: what would use it} for the fields this run never reads (their flags are
        refused)."""
        unused = {}
        if self.peer_norm == 0:
            unused["peer_kind"] = "--peer-norm above 0"
        if self.schedule == "greedy":
            unused["refresh_inputs"] = "--schedule parallel"
        if self.softmax_epochs == 0:
            for name in ("head", "softmax_lr", "softmax_weight_decay"):
                unused[name] = "a head (--softmax-epochs above 0)"
        elif self.head != "sgd":
            for name in ("softmax_lr", "softmax_weight_decay"):
                unused[name] = "--head sgd"
        return unused

    def layer_threshold(self, n_units):
        return self.threshold * (n_units if self.goodness == "sum" else 1)

    # the seams of the training loop and the read-out, which a variant script overrides

    batch_width = property(lambda self: self.layer_sizes[0])  # the columns of a batch's row

    def batches(self, x_train, y_train, state, x):
        return hybrid_batches(x_train, y_train, self, state, x)

    def fresh_network(self, rng):
        """The network's first weights and biases (init_network)."""
        return init_network(self.layer_sizes, rng, self.layer_kinds(), self.init)

    def step_buffers(self, xp):
        return stack_buffers(self, xp)

    def step(self, state, x, lr, trained, n_active, buffers):
        return stack_step(state, x, self, lr, trained, n_active, buffers)

    def layer_kinds(self):
        """Each layer's kind: None, a dense layer (x W)."""
        return [None] * (len(self.layer_sizes) - 1)

    def read_outs(self, state, splits, log=print):
        """The run's own read-outs beside the softmax head, as metrics."""
        return {}

    def head_input(self, x):
        """The digits as the softmax head's features are computed from them."""
        return x

    def fresh_head(self):
        """A head trained along with FF, and its optimisers: none here."""
        return None, None


@dataclass
class FFState:
    """Everything a run needs to continue: parameters, optimiser, generator and history."""
    weights: list
    biases: list
    opt_w: list   # the optimiser of each layer's weights (Adam or SmoothedSGD)
    opt_b: list
    peer_means: list
    rng: np.random.Generator
    epochs_done: int = 0
    history: dict = field(default_factory=lambda: {"loss": [], "accuracy": [], "seconds": []})
    head: list = None  # [W, b] of a head trained along with FF (cfg.fresh_head), else None
    head_opt: list = None  # its optimisers, else None (plain SGD)

    @classmethod
    def fresh(cls, cfg, rng):
        weights, biases = cfg.fresh_network(rng)
        head, head_opt = cfg.fresh_head()
        optimizer = OPTIMIZERS[cfg.optimizer]
        peer_start = 0.5 if cfg.peer_kind == "author" else 0.0  # the author's r starts at 0.5
        return cls(weights, biases,
                   [optimizer(W, weight_decay=cfg.weight_decay) for W in weights],
                   [optimizer(b) for b in biases],
                   [np.full_like(b, peer_start) for b in biases], rng, head=head,
                   head_opt=head_opt)

    def to(self, xp):
        return move_state(self, xp)


def learning_rate(cfg, epoch, fraction):
    """lr at `fraction` of epoch `epoch` (0-based; a greedy stage counts its own): linear-half,
    constant, then linearly to 0 over the second half; linear-half-epochs, the author's,
    stepped once an epoch ((1 + 2 (n - e)) / n in 1-based epoch e > n/2)."""
    n = cfg.n_epochs
    if cfg.lr_decay == "linear-half":
        return cfg.lr * min(1.0, 2.0 * (1.0 - (epoch + fraction) / n))
    if cfg.lr_decay == "linear-half-epochs":
        return cfg.lr * (1.0 if epoch + 1 <= n / 2 else (1 + 2 * (n - epoch - 1)) / n)
    return cfg.lr


def total_epochs(cfg):
    n_layers = len(cfg.layer_sizes) - 1
    return cfg.n_epochs * (n_layers if cfg.schedule == "greedy" else 1)


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    """The command line (ff_runs builds it from FFConfig); returns the exit status."""
    return ff_runs.main(FFConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
