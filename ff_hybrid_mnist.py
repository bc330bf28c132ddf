"""Forward-Forward with hybrid-image MNIST negatives (Hinton 2022, section 3.2).

Each layer of a ReLU MLP is trained on its own objective: make the goodness (mean of
squared activities) of real digits high and that of hybrid images low. A hybrid mixes two
digits through a smooth random mask, so it keeps the short-range statistics of real digits
and destroys their long-range shape. After this unsupervised training the network is frozen
and a linear softmax on the normalised activities of the top layers is fitted to the labels.

The file reads as the algorithm first, then its variants, then the plumbing: hybrid
negatives -> layer maths (forward, goodness, loss and its hand-derived gradient, peer
normalisation, init) -> optimisers -> run configuration (FFConfig, which is also the command
line) and state -> the training loop -> the softmax head -> variants: label negatives
(section 3.3), locally-connected layers -> figure helpers -> MNIST loader -> devices and CPU
speed -> run files -> CLI. Every function takes its array module from its arguments, so
--device gpu runs the same code on CuPy arrays.

    python3 ff_hybrid_mnist.py                      # the SPEC run, seed 0
    python3 ff_hybrid_mnist.py --n-epochs 2 --n-train 5000 --softmax-epochs 5
"""

import argparse
import dataclasses
import datetime
import fcntl
import functools
import gzip
import hashlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

try:  # optional: --device gpu runs the same functions on CuPy arrays
    import cupy
except ImportError:
    cupy = None


# -----------------------------------------------------------------------------
# Hybrid negatives: m*a + (1-m)*b with a smooth random binary mask m

def blur_matrix(n_blur, side=28):
    """The side x side matrix of n_blur passes of the [1/4, 1/2, 1/4] kernel with edge padding.

    Blurring along rows and columns commutes, so n_blur separable passes over a mask M equal
    B M B^T with B = P^n_blur; two small products replace 2*n_blur passes over the batch.
    """
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
    """n boolean masks (n, side*side) in xp's memory: uniform random bits, blurred n_blur
    times, > 0.5. bits: their packed bits (mask_bits) already in xp's memory, else drawn.

    The blurred values are multiples of 4^-(2 n_blur) in [0, 1], so float32 (24-bit
    significand) holds every product and sum exactly up to n_blur = 6, float64 up to 13:
    the threshold sees the exact blur either way, in any summation order, on any device.
    """
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
# Layer maths: normalisation, forward, goodness, FF loss and its hand-derived gradient, peer
# normalisation, init

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


def layer_forward(x_normed, W, b, out=None, index=None, fields=None):
    """h = ReLU(x W + b) for normalised rows x. A locally-connected layer gives its receptive
    fields (index, from local_index) and W as its blocks: x W is then local_product."""
    xp = xp_of(x_normed, W)
    h = (xp.matmul(x_normed, W, out=out) if index is None
         else local_product(x_normed, W, index, out, fields))
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
    # d/dr_j of mean_k (r_k - mean r)^2 is 2 (r_j - mean r)/n_units; the mean's own
    # derivative cancels because the deviations sum to zero.
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


def layer_grads(x_normed, dz, dW, index=None, fields=None):
    """dL/dW = x^T dL/dz into dW, and dL/db. A locally-connected layer (index given) has
    weights only inside its receptive fields: dW is its blocks (local_weight_grad), from the
    fields of x its forward pass gathered (fields; gathered again when None)."""
    xp = xp_of(x_normed, dz)
    if index is None:
        xp.matmul(x_normed.T, dz, out=dW)
    else:
        local_weight_grad(local_fields(x_normed, index) if fields is None else fields, dz, dW)
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
    def allocate(cls, n_rows, n_in, n_out, xp=np, index=None):
        W_shape = (n_in, n_out) if index is None else index.shape + (n_out // len(index),)
        fields = None if index is None else xp.empty((n_rows,) + index.shape, np.float32)
        return cls(xp.empty((n_rows, n_out), np.float32), xp.empty((n_rows, n_out), np.float32),
                   xp.empty(W_shape, np.float32), fields)


INITS = ("sqrt2", "fan-in")


def init_network(layer_sizes, rng, indexes=None, init="sqrt2"):
    """Biases 0; weights N(0, sqrt 2) ("sqrt2") or N(0, 1/sqrt(n_in)) ("fan-in", the author's).
    sqrt2: a unit-norm input gives z ~ N(0, 2), so the mean goodness starts near 1, just
    below the threshold of 2, where the loss is not flat. fan-in: an RMS-normalised input
    (squared length n_in) gives z ~ N(0, 1), half the threshold of a summed goodness.
    A locally-connected layer (indexes: its receptive fields) keeps only the dense draw's
    weights inside its fields, as blocks, scaled up by sqrt(n_in / fan_in) so that an input
    spread evenly gives the dense layer's z: the values the masked dense form had."""
    weights, biases = [], []
    indexes = indexes or [None] * (len(layer_sizes) - 1)
    for n_in, n_out, index in zip(layer_sizes[:-1], layer_sizes[1:], indexes):
        W = rng.standard_normal((n_in, n_out)) * (np.sqrt(2.0) if init == "sqrt2"
                                                  else 1 / np.sqrt(n_in))
        if index is not None:  # the factor in float32, as the masked form computed it
            W = local_blocks(W, index) * np.sqrt(np.float32(n_in) / np.float32(index.shape[1]))
        weights.append(W.astype(np.float32))
        biases.append(np.zeros(n_out, np.float32))
    return weights, biases


def network_activities(weights, biases, x, n_layers=None, norm="l2", local=""):
    """Activities h of each layer (or the first n_layers) for raw input rows x, each layer's
    input normalised by NORMALIZE[norm], computed where the weights live (host rows are
    copied there). local: the run's --local, whose layers' weights are blocks."""
    xp = xp_of(x, *weights)
    if not local and any(W.ndim == 3 for W in weights):
        raise ValueError("locally-connected weights (blocks) need local=cfg.local")
    x = xp.asarray(x)
    indexes = ([xp.asarray(i) for i in local_index(parse_local(local))] if local
               else [None] * len(weights))
    hs = []
    for W, b, index in list(zip(weights, biases, indexes))[:n_layers]:
        x = layer_forward(NORMALIZE[norm](x), W, b, index=index)
        hs.append(x)
    return hs


# -----------------------------------------------------------------------------
# Optimisers, in place (how Adam's passes run on each device is in the devices section)

class Adam:
    """Adam with bias correction (Kingma & Ba 2015) and optional decoupled weight decay
    (AdamW, Loshchilov & Hutter 2019: p *= 1 - lr * weight_decay before the step), in place.
    Decay added to the gradient instead would be divided by sqrt(v_hat) like the gradient,
    a pull of about lr per step whatever the weight's size: that silenced every unit.

    It keeps the undamped sums m_acc = sum_i beta1^(t-i) g_i and v_acc = sum_i
    beta2^(t-i) g_i^2, that is m / (1 - beta1) and v / (1 - beta2) of the textbook, so that
    a step is ten elementwise passes with one scratch buffer and no temporaries:
        p -= lr * m_hat / (sqrt(v_hat) + eps)
           = step_size * m_acc / (sqrt(v_acc) + eps / k),   k = sqrt((1-beta2)/(1-beta2^t)),
    step_size = lr (1-beta1) / ((1-beta1^t) k).
    How the passes run (threaded chunks on the CPU, one fused kernel on the GPU) is below.
    """

    def __init__(self, param, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m_acc = xp_of(param).zeros_like(param)
        self.v_acc = xp_of(param).zeros_like(param)
        self.t = 0
        self.scratch = None  # the CPU passes' buffers, made on the first CPU step

    def step(self, param, grad, lr):
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        # Python floats: a numpy float64 scalar would make every pass over float32 arrays
        # compute in float64 and cast back, at several times the cost
        k = math.sqrt((1 - b2) / (1 - b2 ** self.t))
        step_size = float(lr) * (1 - b1) / ((1 - b1 ** self.t) * k)
        decay = 1.0 - float(lr) * self.weight_decay
        # A moment that stops receiving gradient (an input unit silent for a while) decays
        # geometrically into float32 subnormals, and arithmetic on subnormals is ~100x slower
        # on x86: without this, late epochs ran twice as slow. A moment below 1e-30 moves a
        # weight by less than ~1e-24 per step, so zeroing it every 16 steps is invisible at
        # float32 resolution (the textbook update is kept otherwise).
        flush_below = 1e-30 if self.t % 16 == 0 else 0.0
        scalars = (decay, b1, b2, step_size, self.eps / k, flush_below)
        if xp_of(param) is np:
            if self.scratch is None:
                size = min(param.size, ADAM_CHUNK)
                self.scratch = [np.empty(size, param.dtype) for _ in range(ADAM_THREADS)]
            adam_cpu(param, grad, self.m_acc, self.v_acc, *scalars, self.scratch)
        else:
            adam_kernel()(grad, *scalars, param, self.m_acc, self.v_acc)

    def state_arrays(self):
        return {"m": self.m_acc, "v": self.v_acc, "t": self.t}

    def load_state(self, m, v, t):
        self.m_acc[...], self.v_acc[...], self.t = m, v, int(t)

    def to(self, move):
        self.m_acc, self.v_acc = move(self.m_acc), move(self.v_acc)


class SmoothedSGD:
    """The author's optimiser (his Matlab code): the gradient smoothed over minibatches,
    g = delay g + (1 - delay) grad, and p -= lr (g + weight_decay p), in place. The weight
    cost is not smoothed, so like AdamW's it multiplies p by 1 - lr * weight_decay a step.
    `grad` is overwritten (it serves as the step's scratch buffer)."""

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

    def to(self, move):
        self.g = move(self.g)


OPTIMIZERS = {"adam": Adam, "sgd": SmoothedSGD}


# -----------------------------------------------------------------------------
# Run configuration (also the command line) and the state of a run

def option(default, help, choices=None, low=None, above=False, metavar=None, default_text=None):
    """A field of FFConfig and its command-line flag, declared together: the help text and
    the single-value rules (choices, or a lower bound: >= low, or > low with above)."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low,
                                                above=above, metavar=metavar,
                                                default_text=default_text))


GOODNESS_KINDS = ("mean", "sum")
SCHEDULES = ("parallel", "greedy")
LR_DECAYS = ("none", "linear-half", "linear-half-epochs")
NEGATIVES = ("hybrid", "label")
HARD_FROM = ("goodness", "head")
DEVICES = ("cpu", "gpu")
HEADS = ("lbfgs", "sgd")
N_TRAIN_MAX, N_TEST = 60000, 10000  # digits in the MNIST training and test sets


@dataclass
class FFConfig:
    """Everything a run depends on, checked on construction (ValueError, one line). The
    command line is built from these fields; a run stores its configuration once and
    --resume reads it back."""
    layer_sizes: tuple = option((784, 1000, 1000, 1000, 1000), "comma-separated, input first",
                                metavar="N,N,...", default_text="784,1000,1000,1000,1000")
    n_epochs: int = option(30, "FF epochs (per layer with --schedule greedy)", low=0)
    batch_size: int = option(100, "positives per batch (as many negatives are added)", low=1)
    lr: float = option(0.03, "step size of the FF layers", low=0, above=True)
    optimizer: str = option("adam", "adam; sgd: the author's smoothed-gradient SGD, g = 0.9 g + "
                            "0.1 grad, p -= lr (g + weight_decay p) (the hard-negative head "
                            "then steps the same way, its rate decayed with the FF rate)",
                            choices=("adam", "sgd"))
    weight_decay: float = option(0.0, "decoupled weight decay of the FF weights: each step "
                                 "multiplies them by 1 - lr * weight_decay", low=0)
    lr_decay: str = option("none", "linear-half: constant, then linearly to 0 over the second "
                           "half, step by step; linear-half-epochs: the same, stepped once an "
                           "epoch (the author's)", choices=LR_DECAYS)
    threshold: float = option(2.0, "goodness threshold theta (per unit: --goodness sum uses "
                              "threshold * n_units)", low=0, above=True)
    goodness: str = option("mean", "mean or sum of squared activities; sum uses threshold * "
                           "n_units, so both agree on every input", choices=GOODNESS_KINDS)
    normalize: str = option("l2", "each layer's input (and the heads' features): l2 to unit "
                            "length; rms to a mean square of 1 per component (the author's)",
                            choices=("l2", "rms"))
    init: str = option("sqrt2", "weights N(0, sqrt 2), or N(0, 1/sqrt(fan-in)) (the author's); "
                       "biases 0", choices=("sqrt2", "fan-in"))
    peer_norm: float = option(0.0, "peer-normalisation coefficient, 0 = off", low=0)
    peer_kind: str = option("spread", "with --peer-norm: spread: a loss on the spread of the "
                            "units' running mean activities (gated by the ReLU); author: the "
                            "author's term coef (r - mean r) added to dL/dz of every positive, "
                            "ungated, r from 0.5", choices=("spread", "author"))
    schedule: str = option("parallel", "parallel: every layer learns in every epoch; greedy: "
                           "layer 1 for --n-epochs, then layer 2, ...", choices=SCHEDULES)
    refresh_inputs: bool = option(False, "feed each layer the output of the updated layer "
                                  "below (a second forward pass per layer)")
    negatives: str = option("hybrid", "hybrid: hybrid images (section 3.2); label: the digit "
                            "with a wrong label in its first 10 pixels (section 3.3, "
                            "supervised)", choices=NEGATIVES)
    n_blur: int = option(6, "blur passes of the hybrid mask", low=0)
    local: str = option("", "locally-connected layers instead of dense ones, e.g. "
                        "10:6:64,2:1:128,2:1:128: each unit sees every channel of an RF x RF "
                        "block of locations below (the image: 28 x 28, one channel), blocks "
                        "STRIDE apart, CHANNELS units per location, no weight sharing; the "
                        "layer sizes follow", metavar="RF:STRIDE:CHANNELS,...",
                        default_text="dense layers")
    goodness_layer1: bool = option(False, "with --negatives label: the goodness read-out also "
                                   "sums layer 1")
    hard_negatives: bool = option(False, "with --negatives label: each digit's wrong label "
                                  "drawn with probability softmax(scores) over the nine wrong "
                                  "labels, the scores from --hard-from")
    hard_from: str = option("goodness", "with --hard-negatives: goodness: the goodness "
                            "read-out of every training digit at the epoch's start (about one "
                            "forward pass per label); head: batch by batch, a linear softmax "
                            "on the activities of the digit with the neutral label, trained "
                            "along (the author's; about one forward pass)", choices=HARD_FROM)
    hard_head_lr: float = option(0.1, "with --hard-from head: that head's learning rate",
                                 low=0, above=True)
    hard_head_weight_decay: float = option(0.0, "with --hard-from head and --optimizer sgd: "
                                           "that head's weight cost", low=0)
    top_k: int = option(3, "layers whose activities feed the softmax head", low=1)
    head: str = option("lbfgs", "the softmax head on the frozen network: lbfgs: fitted to its "
                       "optimum by full-batch L-BFGS, its L2 penalty chosen on the validation "
                       "split among HEAD_C; sgd: minibatch SGD for --softmax-epochs at "
                       "--softmax-lr (the reference write-up's)", choices=HEADS)
    softmax_epochs: int = option(50, "epochs of the SGD head; 0 skips the head (either kind)",
                                 low=0)
    softmax_lr: float = option(0.05, "with --head sgd: its step size", low=0, above=True)
    softmax_weight_decay: float = option(1e-4, "with --head sgd: its L2 penalty (wd/2)|W|^2",
                                         low=0)
    seed: int = option(0, "seeds the network, the batches and the negatives (and the head's "
                       "batches, as [seed, 1])", low=0)
    n_train: int = option(None, "use the first N training digits", low=1,
                          default_text="every digit not held out by --val-size")
    val_size: int = option(0, "hold out the last N of the 60000 training digits as a "
                           "validation split, from FF training and the head; its error is "
                           "reported beside the test error", low=0)
    device: str = option("cpu", "gpu: the same code on CuPy arrays (agrees with cpu to float32 "
                         "rounding); a resumed run may change it", choices=DEVICES)

    def __post_init__(self):
        self.layer_sizes = tuple(self.layer_sizes)
        for name in CONFIG_FIELDS:
            check_option(name, getattr(self, name))
        # what follows involves more than one field
        if self.local:
            sizes = local_layer_sizes(parse_local(self.local))
            # the layer sizes follow from the local layers; any other given value is refused
            if self.layer_sizes == CONFIG_FIELDS["layer_sizes"].default:
                self.layer_sizes = sizes
            elif self.layer_sizes != sizes:
                raise ValueError(f"--layer-sizes {shown(self.layer_sizes)} disagrees with "
                                 f"--local {self.local}, whose layers are {shown(sizes)}; "
                                 "leave --layer-sizes out")
        if self.val_size >= N_TRAIN_MAX:
            raise ValueError(f"--val-size {self.val_size} leaves none of the {N_TRAIN_MAX} "
                             "training digits to train on")
        if self.n_train is None:
            self.n_train = N_TRAIN_MAX - self.val_size
        n_layers = len(self.layer_sizes) - 1
        needs = [("top_k", self.top_k > n_layers,
                  f"exceeds the {n_layers} layers of --layer-sizes"),
                 ("n_train", self.n_train + self.val_size > N_TRAIN_MAX,
                  f"and --val-size {self.val_size} together exceed the {N_TRAIN_MAX} "
                  "training digits"),
                 ("batch_size", self.batch_size > self.n_train, f"exceeds --n-train {self.n_train}"),
                 ("hard_negatives", self.hard_negatives and self.negatives != "label",
                  "needs --negatives label"),
                 ("goodness_layer1", self.goodness_layer1 and self.negatives != "label",
                  "needs --negatives label"),
                 ("hard_from", self.hard_from != "goodness" and not self.hard_negatives,
                  "needs --hard-negatives"),
                 ("hard_head_lr", self.hard_head_lr != CONFIG_FIELDS["hard_head_lr"].default
                  and self.hard_from != "head", "needs --hard-from head"),
                 ("hard_head_weight_decay", self.hard_head_weight_decay > 0
                  and (self.hard_from != "head" or self.optimizer != "sgd"),
                  "needs --hard-from head and --optimizer sgd"),
                 ("softmax_lr", self.softmax_lr != CONFIG_FIELDS["softmax_lr"].default
                  and self.head != "sgd", "needs --head sgd (the converged head has no step "
                  "size)"),
                 ("softmax_weight_decay", self.softmax_weight_decay
                  != CONFIG_FIELDS["softmax_weight_decay"].default and self.head != "sgd",
                  "needs --head sgd (the converged head chooses its penalty on validation)"),
                 ("softmax_lr", self.softmax_lr != CONFIG_FIELDS["softmax_lr"].default
                  and self.softmax_epochs == 0, "is unused: --softmax-epochs 0 skips the head"),
                 ("n_blur", self.n_blur != CONFIG_FIELDS["n_blur"].default
                  and self.negatives != "hybrid", "needs --negatives hybrid (the mask of a "
                  "hybrid)"),
                 ("refresh_inputs", self.refresh_inputs and self.schedule == "greedy",
                  "does nothing with --schedule greedy (the layers below are already "
                  "trained and frozen)"),
                 ("weight_decay", self.lr * self.weight_decay >= 1, f"times --lr {self.lr:g} "
                  "is at least 1: each step would multiply the weights by 1 - lr x weight "
                  "decay <= 0, zeroing or flipping them"),
                 ("peer_kind", self.peer_kind != "spread" and self.peer_norm == 0,
                  "needs --peer-norm above 0"),
                 ("negatives", self.negatives == "label" and n_layers < 2
                  and not self.goodness_layer1, "reads goodness from layer 2 up: give at "
                  "least two layers, or --goodness-layer1")]
        for name, broken, why in needs:
            if broken:
                value = getattr(self, name)
                raise ValueError(f"{flag(name)}{'' if isinstance(value, bool) else ' ' + shown(value)} {why}")

    @property
    def local_layers(self):
        return parse_local(self.local)

    @property
    def first_readout_layer(self):
        """1-based: the goodness read-out (and the hard-negative head) use this layer up."""
        return 1 if self.goodness_layer1 else 2

    def layer_threshold(self, n_units):
        return self.threshold * (n_units if self.goodness == "sum" else 1)


CONFIG_FIELDS = FFConfig.__dataclass_fields__


def flag(name):
    return "--" + name.replace("_", "-")


def shown(value):
    """A value as it is written on the command line."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_option(name, value):
    """ValueError, one line naming the flag, when `value` breaks the rules that FFConfig's
    field `name` declares (its type, choices, lower bound); the command line applies the
    same rules to what it parses."""
    f = CONFIG_FIELDS[name]
    meta, kind = f.metadata, f.type

    def refuse(why):
        raise ValueError(f"{flag(name)} {shown(value)} {why}")
    if value is None and f.default is None:
        return
    if kind is bool and not isinstance(value, (bool, np.bool_)):
        refuse("must be true or false")
    if kind is tuple:  # the layer sizes
        if (len(value) < 2 or value[0] != 784
                or not all(isinstance(n, (int, np.integer)) for n in value)):
            refuse("must start with 784 (the input) and have at least one layer, e.g. "
                   "784,1000,1000,1000,1000")
        if min(value) < 1:
            refuse("every layer needs at least 1 unit")
    if kind in (int, float):
        if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            refuse("must be an integer")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            refuse("must be a number")
        if kind is int and abs(int(value)) >= 2 ** 63:
            refuse("is too large: it must be below 2^63")
        if not math.isfinite(value):
            refuse("must be a finite number")
        low, above = meta["low"], meta["above"]
        if low is not None and (value < low or (above and value == low)):
            refuse(f"must be {'>' if above else '>='} {low}")
    if meta["choices"] is not None and value not in meta["choices"]:
        refuse(f"is not one of {', '.join(meta['choices'])}")
    if name == "local":
        parse_local(value)


class TrainingDiverged(RuntimeError):
    """Training that cannot succeed: a NaN or infinite loss, or a layer whose units all went
    silent; the CLI prints it as one line and exits 1."""


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
    head: list = None  # [W, b] of the hard-negative head (--hard-from head), else None
    head_opt: list = None  # its optimisers with --optimizer sgd, else None (plain SGD)

    @classmethod
    def fresh(cls, cfg, rng):
        weights, biases = init_network(cfg.layer_sizes, rng,
                                       local_index(cfg.local_layers) if cfg.local else None,
                                       cfg.init)
        head = head_opt = None
        if cfg.hard_negatives and cfg.hard_from == "head":
            n_features = sum(cfg.layer_sizes[cfg.first_readout_layer:])
            head = [np.zeros((n_features, N_CLASSES), np.float32),
                    np.zeros(N_CLASSES, np.float32)]
            if cfg.optimizer == "sgd":
                head_opt = [SmoothedSGD(head[0], weight_decay=cfg.hard_head_weight_decay),
                            SmoothedSGD(head[1])]
        optimizer = OPTIMIZERS[cfg.optimizer]
        peer_start = 0.5 if cfg.peer_kind == "author" else 0.0  # the author's r starts at 0.5
        return cls(weights, biases,
                   [optimizer(W, weight_decay=cfg.weight_decay) for W in weights],
                   [optimizer(b) for b in biases],
                   [np.full_like(b, peer_start) for b in biases], rng, head=head,
                   head_opt=head_opt)

    def to(self, xp):
        """Every array moved into xp's memory (numpy: the host), in place; returns self."""
        move = to_host if xp is np else xp.asarray
        self.weights = [move(W) for W in self.weights]
        self.biases = [move(b) for b in self.biases]
        self.peer_means = [move(r) for r in self.peer_means]
        if self.head is not None:
            self.head = [move(a) for a in self.head]
        for opt in self.opt_w + self.opt_b + (self.head_opt or []):
            opt.to(move)
        return self


def learning_rate(cfg, epoch, fraction):
    """lr at `fraction` in [0, 1) of epoch `epoch` (0-based; a greedy stage counts its own).
    linear-half: constant for the first half, then linearly to 0 step by step;
    linear-half-epochs: the author's, constant within an epoch, (1 + 2 (n - e)) / n in
    1-based epoch e > n/2, which is linear-half at the epoch's middle."""
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
# The training loop: every layer, every batch, B positives and B fresh negatives

def hybrid_batches(x_train, y_train, cfg, state, x):
    """One epoch of batches: x[:B] real digits, x[B:] hybrids of two other random digits
    (two independent shuffles, a fresh mask per pair). Yields after filling x."""
    n, B, rng, xp = len(x_train), cfg.batch_size, state.rng, xp_of(x_train)
    pos, pa, pb = rng.permutation(n), rng.permutation(n), rng.permutation(n)
    # every batch's mask bits drawn now, in batch order (the stream of drawing them batch by
    # batch), and the epoch's draws moved to the device at once, not batch by batch
    bits = xp.asarray(np.stack([mask_bits(B, rng) for _ in range(n // B)]))
    pos, pa, pb = xp.asarray(np.stack([pos, pa, pb]))
    for i in range(n // B):
        batch = slice(i * B, (i + 1) * B)
        x[:B] = x_train[pos[batch]]
        make_hybrid_batch(x_train[pa[batch]], x_train[pb[batch]], rng, cfg.n_blur, out=x[B:],
                          bits=bits[i])
        yield


def train_layer_step(state, l, x_in, cfg, lr, work, learns=True, refresh=False, index=None):
    """Layer l's part of one step on x_in, the normalised stacked batch (positives, then as
    many negatives): forward, FF loss and gradient, the optimiser on W and b, the peer-norm
    running mean. A frozen layer (greedy: one below the layer that learns) only runs forward.
    index: a locally-connected layer's receptive fields (its weights are then blocks).

    Returns (loss, g, h): loss is NaN for a frozen layer; h is what the layer above sees,
    the output from before this step's update unless refresh.
    """
    W, b = state.weights[l], state.biases[l]
    if not learns:
        h = layer_forward(x_in, W, b, out=work.h, index=index, fields=work.fields)
        return np.nan, goodness(h, cfg.goodness), h
    h = layer_forward(x_in, W, b, out=work.h, index=index, fields=work.fields)
    loss, g = ff_loss_and_dz(h, cfg.batch_size, cfg.layer_threshold(h.shape[1]), cfg.goodness,
                             work.dz)
    if cfg.peer_norm > 0:
        peer_loss, state.peer_means[l][...] = PEER[cfg.peer_kind](
            h, cfg.batch_size, state.peer_means[l], cfg.peer_norm, work.dz)
        loss += peer_loss
    dW, db = layer_grads(x_in, work.dz, work.dW, index, work.fields)
    state.opt_w[l].step(W, dW, lr)
    state.opt_b[l].step(b, db, lr)
    if refresh:
        h = layer_forward(x_in, W, b, out=work.h, index=index, fields=work.fields)
    return loss, g, h


def epoch_sums(losses, goodnesses, n_pos, thresholds):
    """An epoch's sums over its batches, per layer: the loss, the accuracy of telling
    positives from negatives at the layer's threshold, and the batches in which any unit of
    the layer was on; from the epoch's (batch, layer) losses and (batch, layer, row)
    goodnesses (host arrays), each batch's row added in batch order."""
    threshold = np.asarray(thresholds, np.float32)[:, None]  # compared in float32, as g is
    accuracy = ((goodnesses[:, :, :n_pos] > threshold).mean(axis=2)
                + (goodnesses[:, :, n_pos:] < threshold).mean(axis=2)) / 2
    sums = np.zeros((losses.shape[1], 3))
    for row in np.stack([losses, accuracy, goodnesses.max(axis=2) > 0], axis=2):
        sums += row
    return sums


def check_loss(cfg, loss, epoch, l, batch=None):
    """TrainingDiverged for a NaN or infinite loss: a batch's on the CPU, an epoch's sum on
    the GPU (reading a value back every step would stall it)."""
    if not np.isfinite(loss):
        where = f"epoch {epoch + 1}, layer {l + 1}" + ("" if batch is None else f", batch {batch + 1}")
        raise TrainingDiverged(f"FF loss is {loss} in {where}; {likely_cause(cfg)}")


def likely_cause(cfg):
    """The settings that could have made the loss overflow: those far outside the range the
    experiments use, else the learning rate (a weight decay that flips the weights is refused
    before training)."""
    far = [f"{flag(name)} {shown(getattr(cfg, name))}" for name, limit in
           (("threshold", 1e3), ("peer_norm", 1e2), ("lr", 1.0)) if getattr(cfg, name) > limit]
    if far:
        return "out of the usual range: " + ", ".join(far)
    return f"try a lower --lr (now {cfg.lr})"


def check_silent(cfg, sums, trained, epoch):
    """A silent layer has no gradient (ReLU), so it stays silent for good. (A test of
    "accuracy at chance and loss not falling" was measured to stop tiny runs that were still
    learning, so only this certain case stops a run.)"""
    for l in trained:
        if sums[l, 2] == 0:
            cause = (f"--lr {cfg.lr} too high" + (f" or --weight-decay {cfg.weight_decay}"
                                                  if cfg.weight_decay else ""))
            raise TrainingDiverged(
                f"layer {l + 1} went silent in epoch {epoch + 1}: every unit was 0 on every "
                f"batch, so it cannot learn again; likely cause {cause}")


def record_epoch(history, means, n_active, seconds):
    """Appends an epoch's per-layer means; None for a layer above the n_active that ran this
    epoch (greedy) or a NaN, so JSON holds no NaN."""
    for key, column in (("loss", means[:, 0]), ("accuracy", means[:, 1])):
        history[key].append([float(v) if l < n_active and np.isfinite(v) else None
                             for l, v in enumerate(column)])
    history["seconds"].append(seconds)


def progress_line(cfg, history, epoch, elapsed, eta):
    def row(values, fmt):
        return " ".join("  -  " if v is None else fmt(v) for v in values)
    return (f"epoch {epoch + 1:3d}/{total_epochs(cfg)}  FF loss per layer "
            + row(history["loss"][-1], lambda v: f"{v:.3f}")
            + ("  real-vs-hybrid accuracy per layer (%) " if cfg.negatives == "hybrid"
               else "  right-vs-wrong-label accuracy per layer (%) ")
            + row(history["accuracy"][-1], lambda v: f"{100 * v:.1f}")
            + (f"  hard-negative head error {100 * history['head_error'][-1]:.1f}%"
               if history.get("head_error") else "")
            + f"  {history['seconds'][-1]:.1f} s  elapsed {elapsed:.0f} s  eta {eta:.0f} s")


def train_ff(x_train, cfg, state, callback=None, log=print, y_train=None):
    """Train state in place up to total_epochs(cfg), one progress line per epoch.

    Within a step every layer sees the L2-normalised activities that the layer below had
    before its own update of this step (one forward pass serves forward and gradient), unless
    cfg.refresh_inputs. callback(epoch, state) runs after each epoch.
    """
    xp = array_module(cfg.device)
    state.to(xp)
    x_train = xp.asarray(x_train)  # once per run; the batches are gathered where they train
    B, n_layers, epochs = cfg.batch_size, len(cfg.layer_sizes) - 1, total_epochs(cfg)
    n_batches = len(x_train) // B
    x = xp.empty((2 * B, cfg.layer_sizes[0]), np.float32)  # positives, then negatives
    inputs = [xp.empty((2 * B, size), np.float32) for size in cfg.layer_sizes[:-1]]
    indexes = ([xp.asarray(i) for i in local_index(cfg.local_layers)] if cfg.local
               else [None] * n_layers)
    work = [LayerWork.allocate(2 * B, n_in, n_out, xp, index)
            for n_in, n_out, index in zip(cfg.layer_sizes[:-1], cfg.layer_sizes[1:], indexes)]
    normalize = NORMALIZE[cfg.normalize]
    t_start, start_epoch = time.perf_counter(), state.epochs_done
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        trained = range(n_layers) if cfg.schedule == "parallel" else [epoch // cfg.n_epochs]
        n_active = max(trained) + 1  # greedy: the layers below the one that learns run too
        # each step's loss and goodness per layer, kept where they are made and read once
        losses = xp.full((n_batches, n_layers), np.nan)
        goodnesses = xp.zeros((n_batches, n_layers, 2 * B), np.float32)
        for i, _ in enumerate(BATCHES[cfg.negatives](x_train, y_train, cfg, state, x)):
            # a greedy stage decays the rate over its own epochs
            lr = learning_rate(cfg, epoch % cfg.n_epochs, i / n_batches)
            normalize(x, out=inputs[0])
            for l in range(n_active):
                loss, g, h = train_layer_step(state, l, inputs[l], cfg, lr, work[l], l in trained,
                                              refresh=cfg.refresh_inputs and l + 1 < n_active,
                                              index=indexes[l])
                if l in trained and xp is np:
                    check_loss(cfg, loss, epoch, l, i)
                losses[i, l], goodnesses[i, l] = loss, g
                if l + 1 < n_active:
                    normalize(h, out=inputs[l + 1])
        # the GPU's one wait of the epoch
        sums = epoch_sums(to_host(losses), to_host(goodnesses), B,
                          [cfg.layer_threshold(n) for n in cfg.layer_sizes[1:]])
        for l in trained:
            check_loss(cfg, sums[l, 0], epoch, l)
        record_epoch(state.history, sums / n_batches, n_active, time.perf_counter() - t0)
        state.epochs_done = epoch + 1
        elapsed = time.perf_counter() - t_start
        log(progress_line(cfg, state.history, epoch, elapsed,
                          eta=elapsed / (epoch + 1 - start_epoch) * (epochs - epoch - 1)), flush=True)
        check_silent(cfg, sums, trained, epoch)
        if callback is not None:
            callback(epoch, state)
    return state


# -----------------------------------------------------------------------------
# Softmax head on the frozen network

def extract_features(weights, biases, x, top_k, chunk=2000, norm="l2", local=""):
    """concat(normalised h_l) over the top_k layers, float32, computed chunk by chunk; each
    layer's input and each feature block normalised by NORMALIZE[norm]."""
    sizes = [len(b) for b in biases[-top_k:]]
    features = xp_of(*weights).empty((len(x), sum(sizes)), np.float32)
    for start in range(0, len(x), chunk):
        hs = network_activities(weights, biases, x[start:start + chunk], norm=norm, local=local)
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


def train_softmax(F_train, y_train, F_test, y_test, rng, n_epochs, lr, weight_decay,
                  batch_size=256, n_classes=10, log=print, F_val=None, y_val=None):
    """Minibatch SGD on the linear softmax. The per-epoch train error is the running error
    of the minibatches during the epoch (an extra full pass per epoch would cost as much
    as the training itself); validation (if given) and test error are exact, after each
    epoch. Settings are chosen on the validation error, never on the test error.
    A loss that is NaN or infinite raises TrainingDiverged: on the CPU at its step, on the
    GPU at the end of its epoch. The head trains where F_train lives; the epoch's order and
    the labels are moved there once, and its loss and errors are summed there and read
    back once an epoch."""
    xp = xp_of(F_train)
    W = xp.zeros((F_train.shape[1], n_classes), np.float32)
    b = xp.zeros(n_classes, np.float32)
    hist = {"train_error": [], "test_error": [], "loss": [], "seconds": []}
    if F_val is not None:
        hist["val_error"] = []
    n, labels = len(y_train), xp.asarray(y_train)

    def diverged(loss, epoch):
        return TrainingDiverged(
            f"the softmax head's loss is {float(loss)} in head epoch {epoch + 1}; lower "
            f"--softmax-lr (now {lr:g}) or --softmax-weight-decay (now {weight_decay:g})")
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
                raise diverged(loss, epoch)
            W -= lr * dW
            b -= lr * db
            wrong += (logits.argmax(axis=1) != yb).sum()
            loss_sum += loss.astype(np.float64) * len(idx)  # float64, as float(loss) was
        wrong, loss_sum = int(wrong), float(loss_sum)  # the epoch's one read of the two
        if not math.isfinite(loss_sum):
            raise diverged(loss_sum / n, epoch)
        hist["train_error"].append(wrong / n)
        hist["loss"].append(loss_sum / n)
        if F_val is not None:
            hist["val_error"].append(error_rate(F_val, y_val, W, b))
        hist["test_error"].append(error_rate(F_test, y_test, W, b))
        hist["seconds"].append(time.perf_counter() - t0)
        if (epoch + 1) % 5 == 0 or epoch + 1 == n_epochs:
            val = (f"val error {100 * hist['val_error'][-1]:.2f}%  "
                   if F_val is not None else "")
            log(f"softmax epoch {epoch + 1:3d}/{n_epochs}  loss {hist['loss'][-1]:.4f}  "
                f"running train error {100 * hist['train_error'][-1]:.2f}%  {val}"
                f"test error {100 * hist['test_error'][-1]:.2f}%", flush=True)
    return W, b, hist


HEAD_C = (1.0, 10.0, 100.0)  # the converged head's penalty |W|^2 / 2C on the summed
                             # cross-entropy (weight decay 1 / (C n) on the mean): C chosen among
HEAD_GTOL = 1e-6       # converged: no component of the penalised mean loss's gradient above this
HEAD_MAX_ITER = 3000   # L-BFGS iterations a fit may take (a fit that stops here says so)
HEAD_CHOICE_SIZE = 10000  # without a validation split, the penalty is chosen on this many
                          # of the head's training digits (the last), then refitted on all


def fit_softmax_converged(F, y, weight_decay, start=None, F_val=None, y_val=None,
                          n_classes=10, gtol=HEAD_GTOL, max_iter=HEAD_MAX_ITER):
    """The linear softmax fitted to the optimum of softmax_loss_and_grads (mean cross-entropy
    plus (weight_decay/2)|W|^2, b unpenalised) by full-batch L-BFGS (scipy's L-BFGS-B), from
    start = (W, b) or zeros. The loss is convex, so the optimum is unique; the fit stops when
    the gradient's largest component is at most gtol, or after max_iter iterations in all
    (history["converged"] says which). In float32 the line search can stop first, where the
    loss's rounding hides the last decreases: the fit then goes on from there on a float64
    copy of F (history["float64_iterations"]). The head is returned in F's dtype. The
    history holds, per iteration, the loss, the training error of the iterate and (given
    F_val) its validation error."""
    from scipy.optimize import minimize  # the head's optimiser; FF training does not need it

    xp = xp_of(F)
    n_weights = F.shape[1] * n_classes
    labels = xp.asarray(y)
    hist = {"loss": [], "train_error": []}
    if F_val is not None:
        hist["val_error"] = []

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
    """The converged read-out: a converged head for each C in turn (the penalty |W|^2 / 2C on
    the summed cross-entropy, so weight decay 1 / (C n) on the mean loss of n digits), the
    strongest penalty first, each fit started from the previous optimum; the C with the
    least error on the validation split (ties: the stronger penalty) is kept. Without a
    validation split the choice is made on the last HEAD_CHOICE_SIZE fit digits (fits on the
    others) and the chosen C is then fitted on every fit digit, from the choice's optimum.
    The test set plays no part. Returns W, b and the history: each fit's path (loss, training
    and validation error per iteration) and the values tried."""
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
        log(f"converged head, C {C:g}: {hist['iterations']} iterations, largest gradient "
            f"{hist['grad_max']:.1e}{'' if hist['converged'] else ' (NOT converged)'}, error "
            f"on {chosen_on} {100 * hist['choice_error']:.2f}%", flush=True)
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
    """The softmax head on the frozen network: features of the cfg.top_k top layers, fitted
    on fit = (x, y) by fit_head_converged (cfg.head lbfgs) or train_softmax (sgd, with cfg's
    SGD settings; it also logs the test error per epoch), its error on each (name, x, y)
    of splits (one of them "test"). A label run's head sees each digit once, with the neutral
    label. Returns (W, b), the head's history and its metrics."""
    x_fit, y_fit = fit
    if cfg.negatives == "label":
        x_fit = embed_labels(x_fit, None)
        splits = [(name, embed_labels(x, None), y) for name, x, y in splits]
    t0 = time.perf_counter()
    features = lambda x: extract_features(weights, biases, x, cfg.top_k, norm=cfg.normalize,
                                          local=cfg.local)
    F_fit = features(x_fit)
    F = {name: features(x) for name, x, _ in splits}
    y = {name: labels for name, _, labels in splits}
    feature_seconds = time.perf_counter() - t0
    metrics = {"head": cfg.head}
    if cfg.head == "sgd":
        W, b, history = train_softmax(F_fit, y_fit, F["test"], y["test"],
                                      np.random.default_rng([cfg.seed, 1]), cfg.softmax_epochs,
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
# Variant: label negatives (the paper's section 3.3), the label written into the image

N_CLASSES = 10


LABEL_ON = 1.0        # a label pixel that is on: the brightest ink of the digits


LABEL_NEUTRAL = 0.1   # every label pixel of the neutral label, for the softmax read-out


def embed_labels(x, labels, out=None):
    """x with its first 10 pixels (always blank in MNIST) replaced by the one-hot label;
    labels=None writes the neutral label. Every label gives the input the same norm."""
    xp = xp_of(x)
    out = xp.array(x, copy=True) if out is None else out
    if out is not x:
        xp.copyto(out, x)
    out[:, :N_CLASSES] = LABEL_NEUTRAL if labels is None else 0.0
    if labels is not None:
        out[xp.arange(len(out)), xp.asarray(labels)] = LABEL_ON
    return out


def sample_wrong_labels(scores, y, u):
    """One wrong label per row, drawn with probability softmax(scores) over the nine labels
    other than y. scores: (n, 10), e.g. each label's goodness summed over layers (the FF
    logits up to a constant, so a label the network prefers is drawn more often); u: n
    uniform draws in [0, 1) (rng.random(n)), in the memory of scores and y."""
    xp = xp_of(scores)
    s = xp.array(scores, dtype=np.float64)
    s[xp.arange(len(s)), y] = -np.inf
    p = xp.exp(s - s.max(axis=1, keepdims=True))
    cdf = xp.cumsum(p, axis=1)
    u = u * cdf[:, -1]
    wrong = (cdf <= u[:, None]).sum(axis=1)  # the first label whose cdf exceeds u
    return xp.minimum(wrong, N_CLASSES - 1)


def check_head_loss(cfg, loss):
    """TrainingDiverged when the hard-negative head has blown up: a cross-entropy of 1e4
    nats (it starts at log 10), or NaN."""
    if not float(loss) < 1e4:
        raise TrainingDiverged(f"the hard-negative head's loss is {float(loss):.3g}; lower "
                               f"--hard-head-lr (now {cfg.hard_head_lr:g})")


def head_wrong_labels(state, digits, y, cfg, buf, u, gain=1.0):
    """Wrong labels for a batch as the hard-negative head prefers them (the author's Matlab
    recipe): the head is a linear softmax on the normalised activities, layers
    cfg.first_readout_layer up, of the digits with the neutral label; the labels are drawn by
    sample_wrong_labels on its logits with the uniform draws u, then the head takes one step
    on the batch: plain SGD at cfg.hard_head_lr, or with --optimizer sgd the author's
    smoothed step with weight cost, its rate times `gain` (the FF rate's decay).
    buf: a (B, 784) scratch array. Everything stays where the digits are: returns (wrong
    labels, the head's errors on the batch, its loss), the last two unread (on the CPU the
    loss is checked here, on the GPU label_batches checks the epoch's worst)."""
    embed_labels(digits, None, out=buf)
    F = extract_features(state.weights, state.biases, buf,
                         len(cfg.layer_sizes) - cfg.first_readout_layer, norm=cfg.normalize,
                         local=cfg.local)
    W, b = state.head
    with np.errstate(over="ignore", invalid="ignore"):
        loss, dW, db, logits = softmax_loss_and_grads(F, y, W, b)
    if xp_of(logits) is np:
        check_head_loss(cfg, loss)
    wrong = sample_wrong_labels(logits, y, u)
    if state.head_opt is None:
        W -= cfg.hard_head_lr * dW
        b -= cfg.hard_head_lr * db
    else:
        for opt, p, grad in zip(state.head_opt, (W, b), (dW, db)):
            opt.step(p, grad, cfg.hard_head_lr * gain)
    return wrong, (logits.argmax(axis=1) != y).sum(), loss


def label_batches(x_train, y_train, cfg, state, x):
    """One epoch of batches: x[:B] digits with their own label, x[B:] the same digits
    with a wrong label: drawn uniformly from the other nine, or with cfg.hard_negatives as
    the network prefers them: from the network at the start of the epoch
    (sample_wrong_labels on the goodness read-out's scores of every training digit), or with
    cfg.hard_from "head" batch by batch from head_wrong_labels, whose error over the epoch
    goes into state.history["head_error"]. Yields after filling x.

    The epoch's random draws are made at its start, batch by batch (the generator's stream
    is that of drawing them as the batches come), and moved to the device once."""
    n, B, rng, xp = len(x_train), cfg.batch_size, state.rng, xp_of(x_train)
    n_batches = n // B
    pos = rng.permutation(n)
    by_head = cfg.hard_negatives and cfg.hard_from == "head"
    if by_head:
        draws = xp.asarray(np.stack([rng.random(B) for _ in range(n_batches)]))
    elif cfg.hard_negatives:
        scores = goodness_per_label(state.weights, state.biases, x_train, cfg.goodness,
                                    cfg.first_readout_layer, norm=cfg.normalize, local=cfg.local)
        wrong_all = sample_wrong_labels(to_host(scores), y_train, rng.random(n))[pos]
    else:
        steps = np.concatenate([rng.integers(1, N_CLASSES, B) for _ in range(n_batches)])
        wrong_all = (y_train[pos[:n_batches * B]] + steps) % N_CLASSES
    rows, labels = xp.asarray(pos), xp.asarray(y_train[pos])
    wrong_all = None if by_head else xp.asarray(wrong_all)
    errors = worst = 0
    for i in range(n_batches):
        batch = slice(i * B, (i + 1) * B)
        digits, y = x_train[rows[batch]], labels[batch]
        if by_head:
            gain = learning_rate(cfg, state.epochs_done % cfg.n_epochs, i / n_batches) / cfg.lr
            wrong, wrong_guesses, loss = head_wrong_labels(state, digits, y, cfg, x[:B],
                                                           draws[i], gain)
            errors += wrong_guesses
            if xp is not np:
                worst = xp.maximum(worst, loss)
        else:
            wrong = wrong_all[batch]
        embed_labels(digits, y, out=x[:B])
        embed_labels(digits, wrong, out=x[B:])
        yield
    if by_head:
        if xp is not np:
            check_head_loss(cfg, worst)
        state.history.setdefault("head_error", []).append(int(errors) / (n_batches * B))


def goodness_per_label(weights, biases, x, goodness_kind="mean", first_layer=2, chunk=2000,
                       norm="l2", local=""):
    """(n, 10) float64: each digit run once with each label, its goodness summed over the
    layers from first_layer (1-based) up. The paper leaves out layer 1 (first_layer=2)."""
    xp = xp_of(*weights)
    scores = xp.zeros((len(x), N_CLASSES))
    buf = xp.empty((min(chunk, len(x)), x.shape[1]), np.float32)
    for start in range(0, len(x), chunk):
        rows = xp.asarray(x[start:start + chunk])
        for label in range(N_CLASSES):
            labelled = embed_labels(rows, np.full(len(rows), label), out=buf[:len(rows)])
            hs = network_activities(weights, biases, labelled, norm=norm, local=local)
            scores[start:start + len(rows), label] = sum(
                goodness(h, goodness_kind) for h in hs[first_layer - 1:])
    return scores


def goodness_error_rate(weights, biases, x, y, goodness_kind="mean", first_layer=2, norm="l2",
                        local=""):
    """Error of predicting the label with the highest accumulated goodness."""
    scores = goodness_per_label(weights, biases, x, goodness_kind, first_layer, norm=norm,
                                local=local)
    xp = xp_of(scores)
    return float(xp.mean(xp.argmax(scores, axis=1) != xp.asarray(y)))


BATCHES = {"hybrid": hybrid_batches, "label": label_batches}


# -----------------------------------------------------------------------------
# Variant: locally-connected layers (RF:STRIDE:CHANNELS each, no weight sharing)

def parse_local(text):
    """'10:6:64,2:1:128' -> ((10, 6, 64), (2, 1, 128)): receptive field, stride and channels
    of each locally-connected layer; '' -> () (fully connected)."""
    if not text:
        return ()
    try:
        layers = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))
    except ValueError:
        layers = ((),)
    if any(len(layer) != 3 or min(layer) < 1 for layer in layers):
        raise ValueError(f"--local {text} must be RF:STRIDE:CHANNELS per layer, comma-separated "
                         "positive integers, e.g. 10:6:64,2:1:128,2:1:128")
    return layers


def local_layer_sizes(local, side=28):
    """Layer sizes of a locally-connected stack on the side x side image (input first)."""
    sizes, grid = [side * side], side
    for rf, stride, channels in local:
        if rf > grid:
            raise ValueError(f"--local: a receptive field of {rf} does not fit the "
                             f"{grid}x{grid} grid below it")
        grid = (grid - rf) // stride + 1
        sizes.append(grid * grid * channels)
    return tuple(sizes)


def local_masks(local, side=28):
    """The connectivity of each locally-connected layer as a float32 (n_in, n_out) mask.

    A layer's units sit on a square grid, `channels` of them at each location, ordered
    (row, column, channel); the unit at grid location (i, j) sees every channel of the
    rf x rf block of locations of the layer below that starts at (i stride, j stride).
    The image is a 28 x 28 grid with one channel. No weights are shared.
    """
    masks, grid, below = [], side, 1
    for rf, stride, channels in local:
        out = (grid - rf) // stride + 1
        mask = np.zeros((grid, grid, below, out, out, channels), np.float32)
        for i in range(out):
            for j in range(out):
                mask[i * stride:i * stride + rf, j * stride:j * stride + rf, :, i, j, :] = 1
        masks.append(mask.reshape(grid * grid * below, out * out * channels))
        grid, below = out, channels
    return masks


# A locally-connected layer is computed location by location: its weights are blocks
# (locations, fan_in, channels), one per grid location, holding exactly the weights of
# local_masks' dense form that lie inside the mask, in the same unit order.

def local_index(local, side=28):
    """The receptive fields of each locally-connected layer as an int array (locations,
    fan_in): row l lists, in increasing order, the input columns that the units at grid
    location l see (the rows of local_masks' mask that are 1 in their columns), so that
    x[:, index[l]] is location l's input."""
    indexes, grid, below = [], side, 1
    for rf, stride, channels in local:
        out = (grid - rf) // stride + 1
        columns = np.arange(grid * grid * below).reshape(grid, grid, below)
        indexes.append(np.stack([columns[i * stride:i * stride + rf, j * stride:j * stride + rf]
                                 .ravel() for i in range(out) for j in range(out)]))
        grid, below = out, channels
    return indexes


def local_fields(x, index, out=None):
    """The receptive fields of rows x, (rows, locations, fan_in): x[:, index], into out."""
    xp = xp_of(x)
    out = xp.empty((len(x),) + index.shape, x.dtype) if out is None else out
    if xp is np:  # numpy's default mode, "raise", writes through a temporary copy of out
        return np.take(x, index, axis=1, out=out, mode="clip")
    return xp.take(x, index, axis=1, out=out)


def local_product(x, blocks, index, out=None, fields=None):
    """x W of a locally-connected layer: each location's receptive field of x (gathered into
    fields) times that location's (fan_in, channels) block, one batched product
    (locations, rows, fan_in) x (locations, fan_in, channels) written through a transposed
    view straight into the (rows, locations * channels) output."""
    xp = xp_of(x, blocks)
    n_loc, _, channels = blocks.shape
    fields = local_fields(x, index, out=fields)
    out = xp.empty((len(x), n_loc * channels), x.dtype) if out is None else out
    xp.matmul(fields.transpose(1, 0, 2), blocks,
              out=out.reshape(len(x), n_loc, channels).transpose(1, 0, 2))
    return out


def local_weight_grad(fields, dz, dW):
    """dL/dW of a locally-connected layer into its blocks dW: at each location, the
    receptive field's x^T times that location's dL/dz, one batched product."""
    n_loc, _, channels = dW.shape
    return xp_of(dz).matmul(fields.transpose(1, 2, 0),
                            dz.reshape(len(dz), n_loc, channels).transpose(1, 0, 2), out=dW)


def local_blocks(W, index):
    """The entries of a dense (n_in, n_units) matrix inside each location's receptive field,
    as the blocks (locations, fan_in, channels) of a locally-connected layer."""
    xp, n_loc = xp_of(W), len(index)
    return W.reshape(len(W), n_loc, -1)[xp.asarray(index), xp.arange(n_loc)[:, None]]


def local_dense(blocks, index, n_in):
    """The dense (n_in, n_units) matrix of a locally-connected layer, 0 outside the receptive
    fields: the masked form (tests, the weight figure)."""
    xp, (n_loc, _, channels) = xp_of(blocks), blocks.shape
    W = xp.zeros((n_in, n_loc, channels), blocks.dtype)
    W[xp.asarray(index), xp.arange(n_loc)[:, None]] = blocks
    return W.reshape(n_in, n_loc * channels)


def local_stored(a, index):
    """A locally-connected layer's weights (or their optimiser state) as read from a file:
    a dense (n_in, n_units) array, as runs saved before the block form stored them, is
    gathered into blocks; anything else is returned as it is."""
    return local_blocks(a, index) if index is not None and a.ndim == 2 else a


# -----------------------------------------------------------------------------
# Figure helpers shared by the figure scripts: fixed digits, goodness, separation

def evaluation_set(x_test, n, rng, n_blur):
    """n real test digits and n hybrids of test digits, the pairs drawn as in training."""
    real = x_test[rng.choice(len(x_test), n, replace=n > len(x_test))]
    a, b = x_test[rng.choice(len(x_test), n)], x_test[rng.choice(len(x_test), n)]
    hybrids, _ = make_hybrid_batch(a, b, rng, n_blur)
    return real, hybrids


def layer_goodness(weights, biases, x, kind, norm="l2", local=""):
    """Goodness of every layer for raw input rows x: a list of (n,) numpy arrays."""
    return [to_host(goodness(h, kind))
            for h in network_activities(weights, biases, x, norm=norm, local=local)]


def separation(g_real, g_hybrid):
    """Difference of the means over the pooled standard deviation (equal group sizes)."""
    g_real, g_hybrid = np.asarray(g_real, np.float64), np.asarray(g_hybrid, np.float64)
    pooled = np.sqrt((g_real.var() + g_hybrid.var()) / 2)
    return (g_real.mean() - g_hybrid.mean()) / pooled


def goodness_bins(threshold, n_bins=50):
    """Log-spaced bins two decades either side of the threshold. Goodness spans orders of
    magnitude and shifts during training; fixed bins keep GIF frames comparable."""
    return np.geomspace(threshold / 100, threshold * 100, n_bins + 1)


REAL_COLOUR, HYBRID_COLOUR = "tab:blue", "tab:orange"


def draw_goodness_histogram(ax, g_real, g_hybrid, threshold, bins):
    """Real and hybrid goodness on a matplotlib axis, log scale, threshold marked."""
    # values beyond the bins (a dead layer gives g = 0) are counted in the end bins; one
    # filled outline a histogram (stairs), not a bar a bin: the same picture, drawn in
    # about half the time
    for g, colour, label in ((g_real, REAL_COLOUR, "real"), (g_hybrid, HYBRID_COLOUR, "hybrid")):
        counts, _ = np.histogram(np.clip(g, bins[0], bins[-1]), bins)
        ax.stairs(counts, bins, fill=True, color=colour, alpha=0.55, label=label)
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    ax.set_xscale("log")
    ax.set_xlabel("goodness (log; ends hold the outliers)")


# -----------------------------------------------------------------------------
# MNIST: find, verify and read the four IDX files; the validation split

class DataError(Exception):
    """A data or file problem the user can fix; the CLI prints it as one line and exits 1."""


class SettingsError(Exception):
    """Flags that cannot work together (an output path that cannot be written, a flag that
    conflicts with the run being resumed); the CLI prints it as one line and exits 2."""


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


EMBEDDED_MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


HOW_TO_SUPPLY = ("put the four MNIST *-ubyte.gz files in a folder and pass it with "
                 "--data-dir DIR or the MNIST_DIR environment variable")


GZIP_MAGIC = b"\x1f\x8b"


def find_idx_file(folder, name):
    """The path of `name` or `name.gz` in folder, or None."""
    for candidate in (name + ".gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_idx_bytes(path):
    """Raw decompressed bytes of an IDX file, gzip or not (sniffed by its magic)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == GZIP_MAGIC:
            return gzip.decompress(raw)
        if path.endswith(".gz"):
            raise DataError(f"{path}: not a gzip archive")
        return raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot be read or decompressed ({e.__class__.__name__}: {e})")


def parse_idx(data, path, is_images):
    """uint8 array from IDX bytes; checks magic number, dimensions and count."""
    want_magic, want_ndim = (0x803, 3) if is_images else (0x801, 1)
    if len(data) < 4 or int.from_bytes(data[:4], "big") != want_magic:
        got = data[:4].hex() if len(data) >= 4 else "nothing"
        raise DataError(f"{path}: wrong IDX magic number {got}, expected {want_magic:08x} "
                        f"({'images' if is_images else 'labels'})")
    header = 4 + 4 * want_ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(want_ndim)]
    if is_images and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    if len(data) - header != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims[0]} items but the file holds "
                        f"{len(data) - header} bytes of data instead of {int(np.prod(dims))} "
                        "(truncated or padded)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_idx(path, sha256, is_images):
    data = read_idx_bytes(path)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise DataError(f"{path}: SHA-256 of the decompressed file is {got[:16]}..., "
                        f"expected {sha256[:16]}...; the file is damaged or not canonical MNIST")
    return parse_idx(data, path, is_images)


def load_mnist(data_dir=None, files=MNIST_FILES, embedded_dir=EMBEDDED_MNIST_DIR):
    """(x_train, y_train, x_test, y_test): float32 images in [0, 1], shape (n, 784); int64 labels.

    The files come from data_dir (--data-dir), else $MNIST_DIR, else the copy the repository
    ships in data/mnist/; each is checked against its SHA-256 and never changed. Nothing is
    downloaded: a folder without the four files is refused, with how to supply them."""
    names = [name for name, _ in files.values()]
    source = next(((d, src) for d, src in ((data_dir, "--data-dir"),
                                           (os.environ.get("MNIST_DIR"), "MNIST_DIR"),
                                           (embedded_dir, "the repository's data/mnist"))
                   if d), (None, None))
    folder, where = source
    if folder is None:
        raise DataError("no MNIST folder given and no copy in the repository; " + HOW_TO_SUPPLY)
    missing = [n for n in names if not find_idx_file(folder, n)]
    if missing:
        raise DataError(f"{where} folder {folder} lacks {', '.join(missing)} (.gz or raw); "
                        + HOW_TO_SUPPLY)
    arrays = {}
    for role, (name, sha256) in files.items():
        path = find_idx_file(folder, name)
        try:
            arrays[role] = load_idx(path, sha256, is_images=role.endswith("images"))
        except DataError as e:
            raise DataError(f"{e}; replace it with a good copy ({HOW_TO_SUPPLY})")
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[split + "_images"]), len(arrays[split + "_labels"])
        if n_img != n_lab:
            raise DataError(f"{folder}: {split} set has {n_img} images but {n_lab} labels")
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
# Devices and CPU speed, the one place for them: the array module of a run, and Adam's passes
# on the CPU (threaded chunks) and the GPU (one fused kernel). Both do, per element, what
# Adam.step's docstring says, in the same order.

def xp_of(*arrays):
    """numpy, or CuPy when any of the arrays lives on the GPU."""
    return cupy.get_array_module(*arrays) if cupy is not None else np


def array_module(device):
    return cupy if device == "gpu" else np


def to_host(a):
    """a as a numpy array: a GPU array is copied back, a numpy array is returned as it is."""
    return cupy.asnumpy(a) if cupy is not None else a


def row_squares(x):
    """sum_j x_ij^2 of each row: einsum on the CPU (no temporary); on the GPU a product and a
    reduction, two launches, where CuPy's einsum costs several times their host time."""
    xp = xp_of(x)
    return np.einsum("ij,ij->i", x, x) if xp is np else (x * x).sum(axis=1)


def gpu_problem():
    """Why --device gpu cannot run here, in one line; None when CuPy can use a GPU."""
    if cupy is None:
        return ("--device gpu needs CuPy, which is not installed "
                "(pip install -r requirements-gpu.txt, or use the CuPy a GPU machine has)")
    try:  # a device, its driver, the kernel compiler (NVRTC) and cuBLAS must all answer
        int((cupy.arange(2) + 1).sum())
        a = cupy.ones((4, 4), np.float32)
        float((a @ a).sum())
        adam_kernel()(a, 1.0, 0.9, 0.999, 0.01, 1e-8, 0.0, a.copy(), a.copy(), a.copy())
    except Exception as e:  # no driver, no device, a CUDA mismatch: each raises its own kind
        detail = (str(e).splitlines() or [""])[0]
        return (f"--device gpu: CuPy {cupy.__version__} cannot use a GPU here "
                f"({e.__class__.__name__}: {detail})")
    return None


ADAM_CHUNK = 1 << 18    # elements: 1 MiB of float32 per array (bench/bench_adam.py)


ADAM_THREADS = 2


_ADAM_POOL = []


def _adam_pool():
    """The worker threads of Adam's chunked passes, started on first use."""
    if not _ADAM_POOL:
        _ADAM_POOL.append(ThreadPoolExecutor(ADAM_THREADS, thread_name_prefix="adam"))
    return _ADAM_POOL[0]


def adam_cpu(param, grad, m_acc, v_acc, decay, b1, b2, step_size, eps, flush_below, scratch):
    """The passes run over chunks of ADAM_CHUNK elements, so that a chunk of p, g, m, v and
    the scratch stays in cache through all ten instead of each pass streaming the whole layer
    from memory; large parameters are split between ADAM_THREADS threads (numpy releases the
    GIL). Every element sees the same operations either way, so the result is bit for bit
    that of one pass over the whole array."""
    if not (param.flags.c_contiguous and grad.flags.c_contiguous):
        raise ValueError("Adam updates contiguous arrays only")  # reshape would copy
    flat = [a.reshape(-1) for a in (param, grad, m_acc, v_acc)]
    n = flat[0].size
    bounds = [(s, min(s + ADAM_CHUNK, n)) for s in range(0, n, ADAM_CHUNK)]
    args = (flat, decay, b1, b2, step_size, eps, flush_below)
    if len(bounds) < 2 * ADAM_THREADS:
        _adam_chunks(bounds, scratch[0], *args)
    else:
        share = -(-len(bounds) // ADAM_THREADS)
        jobs = [_adam_pool().submit(_adam_chunks, bounds[i * share:(i + 1) * share],
                                    scratch[i], *args) for i in range(ADAM_THREADS)]
        for job in jobs:
            job.result()


def _adam_chunks(bounds, scratch, flat, decay, b1, b2, step_size, eps, flush_below):
    for lo, hi in bounds:
        p, g, m, v = (a[lo:hi] for a in flat)
        tmp = scratch[:hi - lo]
        if decay != 1.0:
            p *= decay
        m *= b1
        m += g
        v *= b2
        np.multiply(g, g, out=tmp)
        v += tmp
        np.sqrt(v, out=tmp)
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp
        if flush_below:
            for moment in (m, v):
                np.abs(moment, out=tmp)
                np.putmask(moment, tmp < flush_below, 0)


@functools.lru_cache(maxsize=None)
def adam_kernel():
    """On the GPU the ten passes are one elementwise kernel: each element is read and written
    once per step instead of ten times. Called (grad, decay, b1, b2, step_size, eps,
    flush_below, param, m_acc, v_acc); the scalars take the arrays' dtype."""
    return cupy.ElementwiseKernel(
        "T g, T decay, T b1, T b2, T step_size, T eps, T flush_below", "T p, T m, T v",
        """
        p *= decay;
        m = m * b1 + g;
        v = v * b2 + g * g;
        p -= step_size * (m / (sqrt(v) + eps));
        if (fabs(m) < flush_below) m = 0;
        if (fabs(v) < flush_below) v = 0;
        """, "ff_adam_step")


# -----------------------------------------------------------------------------
# Run files: model.npz, history.json, metrics.json (written last), checkpoint.npz

def code_commit():
    """The git commit of this file's repository, "-dirty" if tracked code differs from it
    (results, figures and prose do not count); None outside a git checkout. Stored with
    every result so that it can be traced."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                "--untracked-files=no", "--", ".", ":!experiments/results",
                                ":!viz", ":!*.md"], capture_output=True, text=True).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device="cpu"):
    env = {"device": device, "commit": code_commit(), "python": platform.python_version(),
           "numpy": np.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "cpu": platform.processor()}
    if device == "gpu":
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        env.update(gpu=name.decode() if isinstance(name, bytes) else name, cupy=cupy.__version__,
                   cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                   cuda_driver=cupy.cuda.runtime.driverGetVersion())
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        from threadpoolctl import threadpool_info
        env["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads",
                                                  "architecture")} for i in threadpool_info()]
    except ImportError:
        config = np.show_config(mode="dicts") if np.lib.NumpyVersion(np.__version__) >= "1.26.0" else {}
        env["blas"] = config.get("Build Dependencies", {}).get("blas", {}).get("name")
    return env


def peak_rss_mib():
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 ** 2 if sys.platform == "darwin" else 1024)


def atomic_write(path, write):
    """write(file) into a temporary file beside path, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a result file is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def finite_or_none(obj):
    """obj as plain JSON values, every NaN or infinity replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path, obj):
    text = json.dumps(finite_or_none(obj), indent=1, allow_nan=False, default=str)
    atomic_write(path, lambda f: f.write(text.encode()))


READ_ERRORS = (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile)


def damaged_error(path, e):
    detail = (str(e).splitlines() or [""])[0]
    return DataError(f"{path} is damaged or not written by this suite "
                     f"({e.__class__.__name__}: {detail})")


def run_config(raw):
    """The FFConfig stored in a run's checkpoint or model (a field added since the run was
    saved takes its default, except the head: a run saved before the converged head existed
    had the SGD head)."""
    raw = {"head": "sgd", **raw}
    return FFConfig(**{k: v for k, v in raw.items() if k in CONFIG_FIELDS})


def save_checkpoint(run_dir, cfg, state):
    arrays = {"epochs_done": state.epochs_done,
              "rng_state": json.dumps(state.rng.bit_generator.state),
              "config": json.dumps(asdict(cfg)), "history": json.dumps(state.history)}
    for l, (W, b) in enumerate(zip(state.weights, state.biases)):
        arrays.update({f"W{l}": to_host(W), f"b{l}": to_host(b),
                       f"peer{l}": to_host(state.peer_means[l])})
        for name, opt in (("W", state.opt_w[l]), ("b", state.opt_b[l])):
            arrays.update({f"opt_{name}{l}_{k}": to_host(v)
                           for k, v in opt.state_arrays().items()})
    if state.head is not None:
        arrays.update(head_W=to_host(state.head[0]), head_b=to_host(state.head[1]))
    for name, opt in zip("Wb", state.head_opt or []):
        arrays.update({f"opt_head_{name}_{k}": to_host(v) for k, v in opt.state_arrays().items()})
    atomic_write(os.path.join(run_dir, "checkpoint.npz"), lambda f: np.savez(f, **arrays))


def checkpoint_path(run_dir):
    path = os.path.join(run_dir, "checkpoint.npz")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: nothing to resume")
    return path


def read_checkpoint_config(run_dir):
    """(cfg, epochs_done) of the checkpoint in run_dir, without loading the network."""
    path = checkpoint_path(run_dir)
    try:
        with np.load(path) as z:
            return run_config(json.loads(str(z["config"]))), int(z["epochs_done"])
    except READ_ERRORS as e:
        raise damaged_error(path, e) from None


def load_checkpoint(run_dir):
    """(cfg, state) saved after the last finished epoch of the run in run_dir."""
    path = checkpoint_path(run_dir)
    try:
        with np.load(path) as z:
            cfg = run_config(json.loads(str(z["config"])))
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(str(z["rng_state"]))
            state = FFState.fresh(cfg, np.random.default_rng(0))
            state.rng, state.epochs_done = rng, int(z["epochs_done"])
            state.history = json.loads(str(z["history"]))
            indexes = local_index(cfg.local_layers) if cfg.local else [None] * len(state.weights)
            for l, index in enumerate(indexes):
                state.weights[l][...] = local_stored(z[f"W{l}"], index)
                state.biases[l][...] = z[f"b{l}"]
                state.peer_means[l][...] = z[f"peer{l}"]
                for name, opt in (("W", state.opt_w[l]), ("b", state.opt_b[l])):
                    # "adam_": the keys of checkpoints written before --optimizer existed
                    prefix = "opt" if f"opt_{name}{l}_{next(iter(opt.state_arrays()))}" in z \
                        else "adam"
                    opt.load_state(**{k: local_stored(z[f"{prefix}_{name}{l}_{k}"], index)
                                      for k in opt.state_arrays()})
            if state.head is not None:
                state.head[0][...], state.head[1][...] = z["head_W"], z["head_b"]
            for name, opt in zip("Wb", state.head_opt or []):
                opt.load_state(**{k: z[f"opt_head_{name}_{k}"] for k in opt.state_arrays()})
    except READ_ERRORS as e:
        raise damaged_error(path, e) from None
    return cfg, state


RUN_FILES = ("model.npz", "history.json", "metrics.json")


def save_run(run_dir, cfg, state, head, softmax_history, metrics, env=None):
    """model.npz, history.json, then metrics.json, each written whole under a temporary name
    and renamed: a folder holds a finished run exactly when it holds metrics.json."""
    arrays = {"layer_sizes": np.array(cfg.layer_sizes), "config": json.dumps(asdict(cfg))}
    for l, (W, b) in enumerate(zip(state.weights, state.biases)):
        arrays.update({f"W{l}": to_host(W), f"b{l}": to_host(b)})
    if head is not None:
        arrays.update({"softmax_W": to_host(head[0]), "softmax_b": to_host(head[1])})
    history = {"ff": state.history, "softmax": softmax_history, "config": asdict(cfg),
               "environment": env or environment(cfg.device)}
    atomic_write(os.path.join(run_dir, "model.npz"), lambda f: np.savez(f, **arrays))
    write_json(os.path.join(run_dir, "history.json"), history)
    write_json(os.path.join(run_dir, "metrics.json"), metrics)


def machine_memory():
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_needed(cfg):
    """Bytes a run needs at its peak, roughly: per weight the value, its gradient buffer and
    the optimiser's state (Adam 2 arrays, SGD 1); the batch's inputs, activities and dL/dz
    of every layer (and a locally-connected layer's receptive fields); the images; the
    head's features of every training, validation and test digit."""
    sizes, rows = cfg.layer_sizes, 2 * cfg.batch_size
    if cfg.local:  # each location's (fan_in, channels) block
        fields = [index.size for index in local_index(cfg.local_layers)]
        n_weights = sum(f * c for f, (_, _, c) in zip(fields, cfg.local_layers))
    else:
        fields, n_weights = [0], sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    per_weight = 2 + {"adam": 2, "sgd": 1}[cfg.optimizer]
    batch = 3 * rows * sum(sizes) + rows * sum(fields)
    images = 2 * (N_TRAIN_MAX + N_TEST) * sizes[0]
    features = ((cfg.n_train + cfg.val_size + N_TEST) * sum(sizes[-cfg.top_k:])
                if cfg.softmax_epochs else 0)
    return 4 * (per_weight * n_weights + batch + images + features)


def holds_run(run_dir):
    return any(os.path.exists(os.path.join(run_dir, f)) for f in ("model.npz", "checkpoint.npz"))


def lock_run_folder(run_dir):
    """An exclusive lock on run_dir, held until the returned file is closed (or the process
    ends, however it ends): a second process on the same folder is refused at once. Also
    removes the temporary files a killed write left behind."""
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip()
        f.close()
        raise SettingsError(f"{run_dir} is in use by another run (process "
                            f"{other or 'unknown'}); wait for it to end or give another --out")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    for name in os.listdir(run_dir):
        if name.startswith(".tmp-"):
            os.remove(os.path.join(run_dir, name))
    return f


def load_run(run_dir):
    """A saved run: .cfg, .weights, .biases, .head ((W, b) or None), .ff_history,
    .softmax_history, .metrics, .environment, .run_dir. A missing or damaged file raises
    DataError."""
    from types import SimpleNamespace
    paths = [os.path.join(run_dir, name) for name in RUN_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{missing[0]} not found: {run_dir} holds no finished run")
    try:
        with np.load(paths[0]) as z:
            cfg = run_config(json.loads(str(z["config"])))
            n_layers = len(cfg.layer_sizes) - 1
            indexes = local_index(cfg.local_layers) if cfg.local else [None] * n_layers
            weights = [local_stored(z[f"W{l}"], indexes[l]) for l in range(n_layers)]
            biases = [z[f"b{l}"] for l in range(n_layers)]
            head = (z["softmax_W"], z["softmax_b"]) if "softmax_W" in z else None
    except READ_ERRORS as e:
        raise damaged_error(paths[0], e) from None
    documents = []
    for path in paths[1:]:
        try:
            with open(path) as f:
                documents.append(json.load(f))
        except (OSError, ValueError) as e:
            raise damaged_error(path, e) from None
    history, metrics = documents
    try:
        check_history(history, len(weights))
        run = SimpleNamespace(cfg=cfg, weights=weights, biases=biases, head=head,
                              ff_history=history["ff"], softmax_history=history["softmax"],
                              environment=history["environment"], metrics=metrics,
                              run_dir=run_dir)
    except (KeyError, TypeError, ValueError) as e:
        raise damaged_error(paths[1], e) from None
    try:
        bad = [k for k, v in metrics.items() if k.endswith("_error")
               and not (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))]
        if not isinstance(metrics, dict) or bad:
            raise ValueError(f"{bad[0]} is {metrics[bad[0]]!r}, not a number" if bad
                             else "not a JSON object")
    except (AttributeError, ValueError) as e:
        raise damaged_error(paths[2], e) from None
    return run


def check_history(history, n_layers):
    """ValueError unless history.json's curves are what the figures read: per epoch one
    number (or null) per layer for the FF loss and accuracy, and equally long lists of
    numbers for the softmax head."""
    def numbers(values, what):
        if not isinstance(values, list) or not all(
                v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values):
            raise ValueError(f"{what} is not a list of numbers")
    for key in ("loss", "accuracy"):
        rows = history["ff"][key]
        if not isinstance(rows, list):
            raise ValueError(f"ff.{key} is not a list")
        for row in rows:
            numbers(row, f"ff.{key}")
            if len(row) != n_layers:
                raise ValueError(f"ff.{key} has a row of {len(row)} values for {n_layers} layers")
    numbers(history["ff"]["seconds"], "ff.seconds")
    head = history["softmax"]
    if head is None:
        return
    if head.get("kind") == "lbfgs":  # the converged head: the curves of each fit
        fits = head.get("fits")
        if not isinstance(fits, list) or not all(isinstance(f, dict) for f in fits):
            raise ValueError("softmax.fits is not a list of fits")
        groups = [{f"softmax.fits[{i}].{key}": fit.get(key, [])
                   for key in ("loss", "train_error", "val_error")} for i, fit in enumerate(fits)]
    else:
        groups = [{f"softmax.{key}": values for key, values in head.items()}]
    for group in groups:
        for what, values in group.items():
            numbers(values, what)
        if len({len(values) for values in group.values() if values}) > 1:
            raise ValueError("softmax curves of different lengths")


# -----------------------------------------------------------------------------
# CLI: flags -> a checked FFConfig and run folder -> run_experiment() -> one line per error

class RunInterrupted(Exception):
    """Ctrl-C (exit status 130) or SIGTERM (143) during a run; the CLI prints what was kept
    and how to continue as one line."""

    def __init__(self, message, status=130):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM (what timeout, batch schedulers and docker stop send), handled like Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated


def parse_option(name, text):
    """The value of FFConfig field `name` written as `text` on the command line, checked by
    check_option; argparse turns the error into one line and exit status 2."""
    kind = CONFIG_FIELDS[name].type
    try:
        if kind is tuple:
            value = tuple(int(s) for s in text.split(","))
        else:
            value = kind(text)
    except ValueError:
        what = {tuple: "a comma-separated list of integers", int: "an integer",
                float: "a number"}.get(kind, "a value")
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    try:
        check_option(name, value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def number_arg(kind, low, above=False):
    """An argparse type for a script's own numeric flag: a finite `kind` >= low (> low with
    above)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if above else '>='} {low}")
        return value
    return parse


layer_sizes_arg = functools.partial(parse_option, "layer_sizes")


def build_parser(resume=True, description=None, parents=()):
    """The command line, built from FFConfig's fields: every training flag defaults to None,
    so a flag that is not None was given. A figure script adds its own flags as parents
    (they come first) and leaves out --resume when it cannot continue a run."""
    p = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0],
                                parents=list(parents))
    training = p.add_argument_group("training (the run's configuration)")
    for f in dataclasses.fields(FFConfig):
        meta = f.metadata
        default = meta["default_text"] or shown(f.default)
        help_text = f"{meta['help']} (default: {default})"
        if f.type is bool:
            training.add_argument(flag(f.name), action="store_const", const=True,
                                  default=None, help=help_text)
        else:
            metavar = meta["metavar"] or ("{" + ",".join(meta["choices"]) + "}"
                                          if meta["choices"] else f.name.upper())
            training.add_argument(flag(f.name), type=functools.partial(parse_option, f.name),
                                  default=None, metavar=metavar, help=help_text)
    files = p.add_argument_group("data and run folder")
    files.add_argument("--data-dir", help="folder with the four MNIST files (default: "
                       "$MNIST_DIR, else the repository's data/mnist; nothing is downloaded)")
    files.add_argument("--out", help="run folder (default: runs/<timestamp>-<4 random hex "
                       "digits>)")
    files.add_argument("--checkpoint-every", type=number_arg(int, 1), default=1, metavar="K",
                       help="write the checkpoint after every K-th FF epoch and the last "
                            "(default: 1; on a GPU writing it can cost as much as an epoch); "
                            "the time it took is metrics.json's checkpoint_seconds")
    if resume:
        files.add_argument("--resume", metavar="DIR",
                           help="continue the run in DIR, to its own --n-epochs unless "
                                "--n-epochs is given; every other setting is the run's own")
    files.add_argument("--dry-run", action="store_true",
                       help="check every flag and output path, print the configuration and "
                            "exit without loading data or training")
    return p


def flags_given(args):
    """The FFConfig fields whose flags were written on the command line."""
    return {name for name in CONFIG_FIELDS if getattr(args, name, None) is not None}


def unused_fields(cfg):
    """{field: what would use it} for the fields that cfg's run never reads: a flag of one of
    them given on the command line is refused, even at its default value."""
    unused = {}
    if cfg.negatives != "label":
        for name in ("hard_negatives", "goodness_layer1"):
            unused[name] = "--negatives label"
    else:
        unused["n_blur"] = "--negatives hybrid"
    if not cfg.hard_negatives:
        unused["hard_from"] = "--hard-negatives"
    if cfg.hard_from != "head" or not cfg.hard_negatives:
        for name in ("hard_head_lr", "hard_head_weight_decay"):
            unused[name] = "--hard-negatives --hard-from head"
    if cfg.peer_norm == 0:
        unused["peer_kind"] = "--peer-norm above 0"
    if cfg.schedule == "greedy":
        unused["refresh_inputs"] = "--schedule parallel"
    if cfg.softmax_epochs == 0:
        for name in ("head", "softmax_lr", "softmax_weight_decay"):
            unused[name] = "a head (--softmax-epochs above 0)"
    elif cfg.head != "sgd":
        for name in ("softmax_lr", "softmax_weight_decay"):
            unused[name] = "--head sgd"
    return unused


def check_used(cfg, given):
    """SettingsError naming the first given flag that cfg's run would store and ignore."""
    unused = unused_fields(cfg)
    for name in sorted(given & set(unused)):
        raise SettingsError(f"{flag(name)} is given but unused: it needs {unused[name]}")


def check_writable(path, flag_name, folder=True):
    """Refuse, before anything is loaded or trained, an output path that cannot be written:
    a file where a folder goes (or the reverse), a path below a file, a read-only folder."""
    path = os.path.abspath(path)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise SettingsError(f"{flag_name} {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise SettingsError(f"{flag_name} {path} is a folder; give the path of a file")
    existing = path if folder else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SettingsError(f"{flag_name} {path} lies below {existing}, which is a file")
    try:  # a real write: permissions alone miss read-only file systems (and root)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SettingsError(f"{flag_name} {path}: cannot write in {existing} ({e.strerror or e})")


RESUME_MAY_CHANGE = ("n_epochs", "device")  # a GPU run can continue on the CPU and back


def prepare_run(args, parser, default_out=None):
    """Adds args.config (a checked FFConfig) and args.run_dir, before anything is loaded.

    A new run: the given flags over FFConfig's defaults; the folder is --out, else
    default_out(args) (a figure script's), else runs/<timestamp>-<random>, which never
    collides. --resume: the configuration is the run's own; a flag that contradicts it is
    refused, except those in RESUME_MAY_CHANGE and --data-dir. --device gpu without a usable
    GPU raises SettingsError. A bad value exits 2 through parser.error; an unusable path or
    a contradiction raises SettingsError."""
    given = flags_given(args)
    if getattr(args, "resume", None):
        if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
            parser.error("--resume writes into its own folder; leave out --out")
        stored, done = read_checkpoint_config(args.resume)
        for name in sorted(given - set(RESUME_MAY_CHANGE)):
            if getattr(args, name) != getattr(stored, name):
                raise SettingsError(
                    f"{flag(name)} {shown(getattr(args, name))} contradicts the run in "
                    f"{args.resume}, which has {shown(getattr(stored, name))}; --resume keeps "
                    "the run's own settings (only --n-epochs, --device and --data-dir may be "
                    "given)")
        try:
            cfg = dataclasses.replace(stored, **{name: getattr(args, name)
                                                 for name in given & set(RESUME_MAY_CHANGE)})
        except ValueError as e:
            parser.error(str(e))
        if total_epochs(cfg) < done:
            per_epoch = total_epochs(dataclasses.replace(cfg, n_epochs=1))
            raise SettingsError(
                f"--n-epochs {cfg.n_epochs} is fewer than the {done} FF epochs the run in "
                f"{args.resume} has done; give at least {-(-done // per_epoch)}, or leave "
                f"--n-epochs out to continue to the run's own {stored.n_epochs}")
        run_dir = args.resume
        check_writable(run_dir, "--resume")
        if total_epochs(cfg) == done and os.path.exists(os.path.join(run_dir, "metrics.json")):
            args.finished = (f"{run_dir} is finished after {done} FF epochs; nothing to do "
                             "(a larger --n-epochs extends it)")
    else:
        try:
            cfg = FFConfig(**{name: getattr(args, name) for name in given})
        except ValueError as e:
            parser.error(str(e))
        check_used(cfg, given)
        run_dir = args.out or (default_out(args) if default_out else None)
        if run_dir is None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = os.path.join("runs", f"{stamp}-{os.urandom(2).hex()}")
        check_writable(run_dir, "--out")
        if (args.out or default_out) and holds_run(run_dir):
            raise SettingsError(f"{run_dir} already holds a run; "
                                + (f"use --resume {run_dir} or another --out"
                                   if hasattr(args, "resume") else "give another --out"))
    needed, have = memory_needed(cfg), machine_memory()
    if have and needed > have:
        raise SettingsError(f"the run needs about {needed / 2 ** 30:.0f} GiB for weights, "
                            f"optimiser state and buffers; this machine has "
                            f"{have / 2 ** 30:.0f} GiB")
    problem = cfg.device == "gpu" and gpu_problem()
    if problem:
        resumed = getattr(args, "resume", None) and "device" not in given
        raise SettingsError(problem + ("; --device cpu continues the run on the CPU"
                                       if resumed else ""))
    args.config, args.run_dir = cfg, run_dir
    return args


def parse_args(argv=None, parser=None):
    """Parsed and prepared training flags (see prepare_run)."""
    parser = parser or build_parser()
    return prepare_run(parser.parse_args(argv), parser)


def print_dry_run(args, **outputs):
    """What a run would use, one JSON value per line, for --dry-run."""
    for key, value in {"config": asdict(args.config), "run_dir": args.run_dir,
                       "resume": getattr(args, "resume", None), "data_dir": args.data_dir,
                       "memory_gib": round(memory_needed(args.config) / 2 ** 30, 2),
                       "checkpoint_every": getattr(args, "checkpoint_every", 1), **outputs}.items():
        print(f"{key}: {json.dumps(value)}")


@dataclass
class RunResult:
    """What run_experiment() did: the metrics (also in metrics.json), the configuration,
    the folder."""
    metrics: dict
    config: FFConfig
    run_dir: str


def label_read_outs(state, cfg, splits, log=print):
    """A label run's read-outs on each (name, x, y) of splits, as metrics: the paper's (the
    label whose input gives the most goodness) and, with a hard-negative head, the author's
    (that head on the neutral label)."""
    metrics, t0 = {}, time.perf_counter()
    first, n_layers = cfg.first_readout_layer, len(cfg.layer_sizes) - 1
    for name, xs, ys in splits:
        metrics[f"goodness_{name}_error"] = goodness_error_rate(
            state.weights, state.biases, xs, ys, cfg.goodness, first, cfg.normalize, cfg.local)
        if state.head is not None:
            F = extract_features(state.weights, state.biases, embed_labels(xs, None),
                                 n_layers - first + 1, norm=cfg.normalize, local=cfg.local)
            metrics[f"hard_head_{name}_error"] = error_rate(F, ys, *state.head)
    metrics["goodness_seconds"] = time.perf_counter() - t0
    for key, what in (("goodness", "goodness read-out"),
                      ("hard_head", "hard-negative head on the neutral label")):
        if f"{key}_test_error" in metrics:
            log(f"{what}: " + "  ".join(f"{name} error {100 * metrics[f'{key}_{name}_error']:.2f}%"
                                        for name, _, _ in splits), flush=True)
    return metrics


def run_experiment(args, log=print, callback=None):
    """The whole experiment for prepared CLI args (see prepare_run): FF training with a
    checkpoint after every epoch, the read-outs, the run files. callback(epoch, state) runs
    after each FF epoch, once its checkpoint is saved."""
    cfg, run_dir = args.config, args.run_dir
    saved, done = [0], [0]  # epochs in the last checkpoint written; epochs finished
    every, checkpoint_seconds = getattr(args, "checkpoint_every", 1), [0.0]

    def recovery():
        finished = done[0]
        if saved[0] == 0 and finished:
            return (f"{finished} epoch{'s' * (finished != 1)} finished but none was "
                    f"checkpointed yet (--checkpoint-every {every}), so there is nothing to "
                    "resume")
        if saved[0] < finished:
            return (f"{finished} epochs finished; the checkpoint after epoch {saved[0]} is "
                    f"kept (--checkpoint-every {every}): --resume {run_dir} continues from it")
        if saved[0] == 0:
            return "no epoch finished, so there is nothing to resume"
        return (f"the checkpoint after epoch {saved[0]} is kept: --resume {run_dir} "
                "continues from it")

    def after_epoch(epoch, state):
        # an epoch counts as finished for the messages once its checkpoint, if due, is
        # written: a signal during that write leaves the one before it, and says so
        if (epoch + 1) % every == 0 or epoch + 1 == total_epochs(cfg):
            t = time.perf_counter()
            try:
                save_checkpoint(run_dir, cfg, state)
            except OSError as e:
                raise DataError(f"could not write the checkpoint of epoch {epoch + 1} in "
                                f"{run_dir} ({e.strerror or e}); {recovery()}") from None
            checkpoint_seconds[0] += time.perf_counter() - t
            saved[0] = epoch + 1
        done[0] = epoch + 1
        if callback is not None:
            callback(epoch, state)

    lock = lock_run_folder(run_dir)
    try:
        resume = getattr(args, "resume", None)
        if not resume and holds_run(run_dir):  # another process may have started it meanwhile
            raise SettingsError(f"{run_dir} already holds a run; use another --out")
        if resume:
            state = load_checkpoint(run_dir)[1]
            saved[0] = done[0] = state.epochs_done
            log(f"resuming {run_dir} after epoch {state.epochs_done}")
            metrics_path = os.path.join(run_dir, "metrics.json")
            if os.path.exists(metrics_path):  # extended: unfinished until it finishes again
                os.remove(metrics_path)
                log(f"the run is extended to {total_epochs(cfg)} epochs: its metrics.json of "
                    f"{state.epochs_done} epochs is removed until the run finishes")
        else:
            state = FFState.fresh(cfg, np.random.default_rng(cfg.seed))
        # read now: a long run's files name the code it ran, not what the checkout holds later
        env = environment(cfg.device)
        x_train, y_train, x_test, y_test = load_mnist(args.data_dir)
        x_train, y_train, x_val, y_val = split_validation(x_train, y_train, cfg.val_size,
                                                          cfg.n_train)
        write_json(os.path.join(run_dir, "args.json"), asdict(cfg))
        log(f"run folder {run_dir}; {len(x_train)} training digits; layers "
            f"{'-'.join(map(str, cfg.layer_sizes))}; {total_epochs(cfg)} FF epochs")

        t0 = time.perf_counter()
        train_ff(x_train, cfg, state, callback=after_epoch, log=log, y_train=y_train)
        ff_seconds = sum(state.history["seconds"])
        head, softmax_history, metrics = None, None, {}
        splits = [s for s in (("val", x_val, y_val), ("test", x_test, y_test)) if len(s[1])]
        if cfg.negatives == "label":
            metrics.update(label_read_outs(state, cfg, splits, log))
        if cfg.softmax_epochs > 0:
            head, softmax_history, head_metrics = fit_head(
                state.weights, state.biases, cfg, (x_train, y_train), splits, log)
            metrics.update(head_metrics)
        last = lambda key: state.history[key][-1] if state.history[key] else None
        metrics.update(ff_loss=last("loss"), ff_seconds=ff_seconds, ff_epochs=state.epochs_done,
                       checkpoint_seconds=checkpoint_seconds[0],
                       total_seconds=time.perf_counter() - t0, peak_rss_mib=peak_rss_mib(),
                       run_dir=run_dir)
        metrics["real_vs_hybrid_accuracy" if cfg.negatives == "hybrid"
                else "pos_vs_neg_accuracy"] = last("accuracy")
        try:
            save_run(run_dir, cfg, state, head, softmax_history, metrics, env)
        except OSError as e:
            raise DataError(f"could not save the run in {run_dir} ({e.strerror or e}); "
                            f"{recovery()}, fits the head again and saves the run") from None
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        raise RunInterrupted(f"{'terminated' if terminated else 'interrupted'}; {recovery()}",
                             143 if terminated else 130) from None
    finally:
        lock.close()
    log(final_line(metrics, ff_seconds, run_dir))
    return RunResult(metrics, cfg, run_dir)


def final_line(metrics, ff_seconds, run_dir):
    """The run's last line: the goodness read-out first for a label run (the paper's
    metric), then the softmax head's errors."""
    parts = []
    for key, what in (("goodness_{}_error", "goodness read-out"),
                      ("hard_head_{}_error", "hard-negative head"), ("{}_error", "softmax head")):
        errors = [f"{split} error {100 * metrics[key.format(split)]:.2f}%"
                  for split in ("val", "test", "train") if key.format(split) in metrics]
        if errors:
            parts.append(f"{what}: " + "  ".join(errors))
    return "; ".join(parts + [f"FF {ff_seconds:.0f} s -> {run_dir}"])


def exit_status(body):
    """body() -> exit status; the errors a user can act on become one line on stderr.
    SIGTERM is handled like Ctrl-C until body returns; then the caller's handler is back (a
    test or a notebook that calls main() keeps its own)."""
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave the signal alone
        previous = None
    try:
        return handled(body)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def handled(body):
    """body() -> exit status, the errors a user can act on as one line on stderr."""
    try:
        return body()
    except SettingsError as e:
        error, status = e, 2
    except RunInterrupted as e:
        error, status = e, e.status
    except KeyboardInterrupt as e:  # outside training (loading, drawing): nothing to continue
        terminated = isinstance(e, Terminated)
        error, status = ("terminated" if terminated else "interrupted"), 143 if terminated else 130
    except (DataError, TrainingDiverged, OSError) as e:
        error, status = e, 1
    print(f"error: {error}", file=sys.stderr)
    return status


def main(argv=None):
    def body():
        args = parse_args(argv)
        if getattr(args, "finished", None):
            print(args.finished)
        elif args.dry_run:
            print_dry_run(args)
        else:
            run_experiment(args)
        return 0
    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
