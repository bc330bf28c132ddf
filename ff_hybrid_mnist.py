"""Forward-Forward with hybrid-image MNIST negatives (Hinton 2022, section 3.2).

Each layer of a ReLU MLP is trained on its own objective: make the goodness
(mean of squared activities) of real digits high and that of hybrid images
low. A hybrid mixes two digits through a smooth random mask, so it keeps the
short-range statistics of real digits and destroys their long-range shape.
After this unsupervised training the network is frozen and a linear softmax
on the L2-normalised activities of the top layers is fitted to the labels.

The file reads in the order the data flows:
MNIST -> hybrid negatives -> layer maths -> Adam -> FF training loop ->
softmax head -> run artefacts -> CLI.

    python3 ff_hybrid_mnist.py                      # the SPEC run, seed 0
    python3 ff_hybrid_mnist.py --n-epochs 2 --n-train 5000 --softmax-epochs 5
"""

import argparse
import datetime
import gzip
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

# -----------------------------------------------------------------------------
# MNIST: find, download, verify and read the four IDX files

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
MNIST_MIRRORS = [
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
EMBEDDED_MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")
HOW_TO_SUPPLY = ("put the four MNIST *-ubyte.gz files in a folder and pass it with "
                 "--data-dir DIR or the MNIST_DIR environment variable")


GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
    """A data problem the user can fix; the CLI prints it as one line and exits 1."""


def default_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ff-hybrid-mnist")


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


def download_mnist(cache_dir, files, mirrors, log=sys.stderr):
    """Fetch the missing files into cache_dir; each is verified before it is renamed into place."""
    os.makedirs(cache_dir, exist_ok=True)
    for name, sha256 in files.values():
        if find_idx_file(cache_dir, name):
            continue
        errors = []
        for mirror in mirrors:
            url = mirror + name + ".gz"
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".part", dir=cache_dir)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
                    total = int(resp.headers.get("Content-Length") or 0)
                    done = 0
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        done += len(chunk)
                        if total:
                            print(f"\rdownloading {url}: {100 * done // total:3d}%", end="", file=log)
                    print(f"\rdownloading {url}: {done} bytes", file=log)
                if not _is_gzip(tmp):
                    raise DataError("not a gzip archive")
                if hashlib.sha256(read_idx_bytes(tmp)).hexdigest() != sha256:
                    raise DataError("SHA-256 of the decompressed file does not match")
                os.replace(tmp, os.path.join(cache_dir, name + ".gz"))
                break
            except (OSError, DataError, ValueError) as e:
                errors.append(f"{url} ({e})")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            raise DataError(f"could not download {name}.gz from any mirror: "
                            + "; ".join(errors) + f". Offline? {HOW_TO_SUPPLY}")


def _is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def load_mnist(data_dir=None, files=MNIST_FILES, mirrors=MNIST_MIRRORS, cache_dir=None,
               embedded_dir=EMBEDDED_MNIST_DIR):
    """(x_train, y_train, x_test, y_test): float32 images in [0, 1], shape (n, 784); int64 labels.

    Search order: data_dir (--data-dir), $MNIST_DIR, the repository's data/mnist/, the user
    cache, then a verified download into the cache. A folder named explicitly must hold the
    files and is never changed, even when it is the cache; a damaged file that the search
    found in the cache is removed so the next run downloads it again.
    """
    cache_dir = cache_dir or default_cache_dir()
    names = [name for name, _ in files.values()]
    from_cache = False  # only files the suite put in its own cache may be deleted
    explicit = [(d, src) for d, src in ((data_dir, "--data-dir"),
                                        (os.environ.get("MNIST_DIR"), "MNIST_DIR")) if d]
    if explicit:
        folder, source = explicit[0]
        missing = [n for n in names if not find_idx_file(folder, n)]
        if missing:
            raise DataError(f"{source} folder {folder} lacks {', '.join(missing)} (.gz or raw); "
                            + HOW_TO_SUPPLY)
    else:
        def complete(d):
            return all(find_idx_file(d, n) for n in names)
        folder = next((d for d in (embedded_dir, cache_dir) if d and complete(d)), None)
        if folder is None:
            download_mnist(cache_dir, files, mirrors)
            folder = cache_dir
        from_cache = folder == cache_dir
    arrays = {}
    for role, (name, sha256) in files.items():
        path = find_idx_file(folder, name)
        try:
            arrays[role] = load_idx(path, sha256, is_images=role.endswith("images"))
        except DataError as e:
            if from_cache:
                os.remove(path)
                raise DataError(f"{e}; removed it from the cache, re-run to download it again")
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


def make_masks(n, rng, n_blur=6, side=28):
    """n boolean masks (n, side*side): uniform random bits, blurred n_blur times, > 0.5.

    The blurred values are multiples of 4^-(2 n_blur) in [0, 1], so float32 (24-bit
    significand) holds every product and sum exactly up to n_blur = 6, float64 up to 13:
    the threshold sees the exact blur either way.
    """
    dtype = np.float32 if n_blur <= 6 else np.float64
    B = blur_matrix(n_blur, side).astype(dtype)
    bits = np.unpackbits(np.frombuffer(rng.bytes(-(-n * side * side // 8)), np.uint8))
    bits = bits[:n * side * side].reshape(n * side, side).astype(dtype)
    rows_blurred = (bits @ B.T).reshape(n, side, side)                 # M B^T
    blurred = rows_blurred.transpose(0, 2, 1).reshape(n * side, side) @ B.T  # (B M B^T)^T
    return (blurred.reshape(n, side, side).transpose(0, 2, 1) > 0.5).reshape(n, side * side)


def make_hybrid_batch(a, b, rng, n_blur=6, out=None):
    """Hybrids of image rows a and b, one fresh mask per pair; returns (hybrids, masks)."""
    masks = make_masks(len(a), rng, n_blur)
    out = np.empty_like(a) if out is None else out
    np.copyto(out, b)
    np.copyto(out, a, where=masks)
    return out, masks


# -----------------------------------------------------------------------------
# Layer maths: forward, goodness, FF loss and its hand-derived gradient

def l2_normalize(x, out=None, eps=1e-8):
    """Rows scaled to unit length, so a layer sees only the direction of the layer below."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    norm += eps
    return np.divide(x, norm[:, None], out=out)


def layer_forward(x_normed, W, b, out=None):
    """h = ReLU(x W + b) for L2-normalised rows x."""
    h = np.matmul(x_normed, W, out=out)
    h += b
    return np.maximum(h, 0, out=h)


def goodness(h, kind="mean"):
    """Mean (the SPEC) or sum of squared activities per row."""
    g = np.einsum("ij,ij->i", h, h)
    return g / h.shape[1] if kind == "mean" else g


def sigmoid(t):
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # no overflow for any t


def layer_loss_and_grads(x_normed, W, b, n_pos, threshold, goodness_kind="mean",
                         peer_coef=0.0, peer_mean=None, peer_momentum=0.9, work=None):
    """FF loss of one layer and its gradient with respect to W and b.

    Rows of x_normed are L2-normalised inputs, the n_pos positives first, then as many
    negatives. With s = -1 for a positive and +1 for a negative,
        L = (1/n_pos) sum_rows softplus(s (g - threshold))
    so dL/dg = s sigmoid(s (g - threshold)) / n_pos, dg/dh = 2h/n_units (mean) or 2h (sum),
    and dh/dz = [z > 0], which h carries already (h = 0 wherever z <= 0).

    Peer normalisation (peer_coef > 0): r = momentum * peer_mean + (1 - momentum) * mean
    activity of each unit over the positives, and L += peer_coef * mean_j (r_j - mean(r))^2,
    which pulls every unit's running mean activity towards the layer's mean.

    Returns loss, dW, db, h, g, r (r is None without peer normalisation). `work` holds
    preallocated buffers (see LayerWork) so the training loop allocates nothing large.
    """
    n_rows, n_units = len(x_normed), W.shape[1]
    h = layer_forward(x_normed, W, b, out=None if work is None else work.h)
    g = goodness(h, goodness_kind)
    margin = g - threshold
    margin[:n_pos] *= -1
    loss = np.logaddexp(0.0, margin).sum() / n_pos
    dloss_dg = sigmoid(margin) / n_pos
    dloss_dg[:n_pos] *= -1
    scale = 2.0 / n_units if goodness_kind == "mean" else 2.0
    dz = np.multiply(h, (scale * dloss_dg)[:, None].astype(h.dtype, copy=False),
                     out=None if work is None else work.dz)
    r = None
    if peer_coef > 0:
        activity = h[:n_pos].mean(axis=0)
        r = peer_momentum * peer_mean + (1 - peer_momentum) * activity
        deviation = r - r.mean()
        loss += peer_coef * np.mean(deviation ** 2)
        # d/dr_j of mean_k (r_k - mean r)^2 is 2 (r_j - mean r)/n_units; the mean's own
        # derivative cancels because the deviations sum to zero.
        dactivity = peer_coef * (1 - peer_momentum) * 2.0 / n_units * deviation / n_pos
        dz[:n_pos] += (h[:n_pos] > 0) * dactivity.astype(h.dtype, copy=False)
    dW = np.matmul(x_normed.T, dz, out=None if work is None else work.dW)
    db = dz.sum(axis=0)
    return loss, dW, db, h, g, r


@dataclass
class LayerWork:
    """Buffers reused by every step of one layer: activities, dL/dz and dL/dW."""
    h: np.ndarray
    dz: np.ndarray
    dW: np.ndarray

    @classmethod
    def allocate(cls, n_rows, n_in, n_out):
        return cls(np.empty((n_rows, n_out), np.float32), np.empty((n_rows, n_out), np.float32),
                   np.empty((n_in, n_out), np.float32))


def init_network(layer_sizes, rng):
    """Weights N(0, sqrt 2), biases 0. A unit-norm input then gives z ~ N(0, 2), so the
    mean goodness starts near 1, just below the threshold of 2, where the loss is not flat."""
    weights, biases = [], []
    for n_in, n_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        weights.append((rng.standard_normal((n_in, n_out)) * np.sqrt(2.0)).astype(np.float32))
        biases.append(np.zeros(n_out, np.float32))
    return weights, biases


def network_activities(weights, biases, x, n_layers=None):
    """Activities h of each layer (or the first n_layers) for raw input rows x."""
    hs = []
    for W, b in list(zip(weights, biases))[:n_layers]:
        x = layer_forward(l2_normalize(x), W, b)
        hs.append(x)
    return hs


# -----------------------------------------------------------------------------
# Adam, in place

class Adam:
    """Adam with bias correction (Kingma & Ba 2015) and optional L2 weight decay, in place.

    It keeps the undamped sums m_acc = sum_i beta1^(t-i) g_i and v_acc = sum_i
    beta2^(t-i) g_i^2, that is m / (1 - beta1) and v / (1 - beta2) of the textbook, so that
    a step is ten elementwise passes with one scratch buffer and no temporaries:
        p -= lr * m_hat / (sqrt(v_hat) + eps)
           = step_size * m_acc / (sqrt(v_acc) + eps / k),   k = sqrt((1-beta2)/(1-beta2^t)),
    step_size = lr (1-beta1) / ((1-beta1^t) k).

    The passes run over chunks of ADAM_CHUNK elements, so that a chunk of p, g, m, v and the
    scratch stays in cache through all ten instead of each pass streaming the whole layer
    from memory; large parameters are split between ADAM_THREADS threads (numpy releases the
    GIL). Every element sees the same operations either way, so the result is bit for bit
    that of one pass over the whole array.
    """

    def __init__(self, param, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m_acc = np.zeros_like(param)
        self.v_acc = np.zeros_like(param)
        self.t = 0
        size = min(param.size, ADAM_CHUNK)
        self.scratch = [np.empty(size, param.dtype) for _ in range(ADAM_THREADS)]

    def step(self, param, grad, lr):
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        # Python floats: a numpy float64 scalar would make every pass over float32 arrays
        # compute in float64 and cast back, at several times the cost
        k = math.sqrt((1 - b2) / (1 - b2 ** self.t))
        step_size = float(lr) * (1 - b1) / ((1 - b1 ** self.t) * k)
        flush = self.t % 16 == 0
        if not (param.flags.c_contiguous and grad.flags.c_contiguous):
            raise ValueError("Adam updates contiguous arrays only")  # reshape would copy
        flat = [a.reshape(-1) for a in (param, grad, self.m_acc, self.v_acc)]
        n = flat[0].size
        bounds = [(s, min(s + ADAM_CHUNK, n)) for s in range(0, n, ADAM_CHUNK)]
        args = (flat, b1, b2, step_size, self.eps / k, flush)
        if len(bounds) < 2 * ADAM_THREADS:
            self._chunks(bounds, self.scratch[0], *args)
        else:
            share = -(-len(bounds) // ADAM_THREADS)
            jobs = [_adam_pool().submit(self._chunks, bounds[i * share:(i + 1) * share],
                                        self.scratch[i], *args) for i in range(ADAM_THREADS)]
            for job in jobs:
                job.result()

    def _chunks(self, bounds, scratch, flat, b1, b2, step_size, eps, flush):
        for lo, hi in bounds:
            p, g, m, v = (a[lo:hi] for a in flat)
            tmp = scratch[:hi - lo]
            if self.weight_decay:
                np.multiply(p, self.weight_decay, out=tmp)
                g += tmp
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
            if flush:
                # A moment that stops receiving gradient (an input unit silent for a while)
                # decays geometrically into float32 subnormals, and arithmetic on subnormals
                # is ~100x slower on x86: without this, late epochs ran twice as slow. A
                # moment below 1e-30 moves a weight by less than ~1e-24 per step, so zeroing
                # it is invisible at float32 resolution (the textbook update is kept otherwise).
                for moment in (m, v):
                    np.abs(moment, out=tmp)
                    np.putmask(moment, tmp < 1e-30, 0)

    def load_state(self, m_acc, v_acc, t):
        self.m_acc[...], self.v_acc[...], self.t = m_acc, v_acc, int(t)


ADAM_CHUNK = 1 << 18    # elements: 1 MiB of float32 per array (bench/bench_adam.py)
ADAM_THREADS = 2
_ADAM_POOL = []


def _adam_pool():
    """The worker threads of Adam's chunked passes, started on first use."""
    if not _ADAM_POOL:
        _ADAM_POOL.append(ThreadPoolExecutor(ADAM_THREADS, thread_name_prefix="adam"))
    return _ADAM_POOL[0]


# -----------------------------------------------------------------------------
# FF training: every layer, every batch, B positives and B fresh hybrids

@dataclass
class FFConfig:
    layer_sizes: tuple = (784, 1000, 1000, 1000, 1000)
    n_epochs: int = 30
    batch_size: int = 100
    lr: float = 0.03
    threshold: float = 2.0
    n_blur: int = 6
    weight_decay: float = 0.0
    goodness: str = "mean"        # "sum": threshold * n_units per layer, equal at any goodness
    peer_norm: float = 0.0
    schedule: str = "parallel"    # "greedy": layer 1 for n_epochs, then layer 2, ...
    lr_decay: str = "none"        # "linear-half": constant, then linear to 0 over the 2nd half
    refresh_inputs: bool = False  # recompute a layer's output after its update before the next

    def layer_threshold(self, n_units):
        return self.threshold * (n_units if self.goodness == "sum" else 1)


class TrainingDiverged(RuntimeError):
    """A loss that is NaN or infinite; the CLI prints it as one line and exits 1."""


@dataclass
class FFState:
    """Everything a run needs to continue: parameters, optimiser, generator and history."""
    weights: list
    biases: list
    adam_w: list
    adam_b: list
    peer_means: list
    rng: np.random.Generator
    epochs_done: int = 0
    history: dict = field(default_factory=lambda: {k: [] for k in (
        "loss", "g_pos", "g_neg", "accuracy", "seconds", "lr")})

    @classmethod
    def fresh(cls, cfg, rng):
        weights, biases = init_network(cfg.layer_sizes, rng)
        return cls(weights, biases,
                   [Adam(W, weight_decay=cfg.weight_decay) for W in weights],
                   [Adam(b) for b in biases],
                   [np.zeros_like(b) for b in biases], rng)


def learning_rate(cfg, progress):
    """lr at a fraction `progress` in [0, 1) of all training steps."""
    if cfg.lr_decay == "linear-half":
        return cfg.lr * min(1.0, 2.0 * (1.0 - progress))
    return cfg.lr


def total_epochs(cfg):
    n_layers = len(cfg.layer_sizes) - 1
    return cfg.n_epochs * (n_layers if cfg.schedule == "greedy" else 1)


def train_ff(x_train, cfg, state, callback=None, log=print):
    """Train state in place up to total_epochs(cfg), one progress line per epoch.

    Within a step every layer sees the L2-normalised activities that the layer below had
    before its own update of this step (one forward pass serves forward and gradient), unless
    cfg.refresh_inputs. callback(epoch, state) runs after each epoch.
    """
    n, B = len(x_train), cfg.batch_size
    n_batches = n // B
    n_layers = len(cfg.layer_sizes) - 1
    epochs = total_epochs(cfg)
    x = np.empty((2 * B, cfg.layer_sizes[0]), np.float32)  # positives, then hybrids
    inputs = [np.empty((2 * B, size), np.float32) for size in cfg.layer_sizes[:-1]]
    work = [LayerWork.allocate(2 * B, n_in, n_out)
            for n_in, n_out in zip(cfg.layer_sizes[:-1], cfg.layer_sizes[1:])]
    thresholds = [cfg.layer_threshold(n_out) for n_out in cfg.layer_sizes[1:]]
    rng, hist = state.rng, state.history
    t_start, start_epoch = time.perf_counter(), state.epochs_done
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        trained = (range(n_layers) if cfg.schedule == "parallel"
                   else [epoch // cfg.n_epochs])
        top = max(trained) + 1
        pos, pa, pb = rng.permutation(n), rng.permutation(n), rng.permutation(n)
        sums = np.zeros((4, n_layers))  # loss, g_pos, g_neg, accuracy
        for i in range(n_batches):
            batch = slice(i * B, (i + 1) * B)
            x[:B] = x_train[pos[batch]]
            make_hybrid_batch(x_train[pa[batch]], x_train[pb[batch]], rng, cfg.n_blur, out=x[B:])
            # a greedy stage decays the rate over its own epochs
            lr = learning_rate(cfg, (epoch % cfg.n_epochs + i / n_batches) / cfg.n_epochs)
            l2_normalize(x, out=inputs[0])
            for l in range(top):
                W, b = state.weights[l], state.biases[l]
                if l not in trained:  # greedy: a frozen layer below only passes data up
                    h = layer_forward(inputs[l], W, b, out=work[l].h)
                    g = goodness(h, cfg.goodness)
                    loss = np.nan
                else:
                    loss, dW, db, h, g, r = layer_loss_and_grads(
                        inputs[l], W, b, B, thresholds[l], cfg.goodness,
                        cfg.peer_norm, state.peer_means[l], work=work[l])
                    if not np.isfinite(loss):
                        raise TrainingDiverged(f"FF loss is {loss} in epoch {epoch + 1}, "
                                               f"layer {l + 1}, batch {i + 1}; try a lower --lr")
                    state.adam_w[l].step(W, dW, lr)
                    state.adam_b[l].step(b, db, lr)
                    if r is not None:
                        state.peer_means[l][...] = r
                    if cfg.refresh_inputs and l + 1 < top:
                        h = layer_forward(inputs[l], W, b, out=work[l].h)
                if l + 1 < top:
                    l2_normalize(h, out=inputs[l + 1])
                gp, gn = g[:B].mean(), g[B:].mean()
                acc = ((g[:B] > thresholds[l]).mean() + (g[B:] < thresholds[l]).mean()) / 2
                sums[:, l] += (loss, gp, gn, acc)
        means = sums / n_batches
        seconds = time.perf_counter() - t0
        for key, row in zip(("loss", "g_pos", "g_neg", "accuracy"), means):
            # None: a layer not trained this epoch (greedy), so JSON holds no NaN
            hist[key].append([float(v) if l < top and np.isfinite(v) else None
                              for l, v in enumerate(row)])
        hist["seconds"].append(seconds)
        hist["lr"].append(lr)
        state.epochs_done = epoch + 1
        elapsed = time.perf_counter() - t_start
        eta = elapsed / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        log(f"epoch {epoch + 1:3d}/{epochs}  loss "
            + " ".join("  -  " if v is None else f"{v:.3f}" for v in hist["loss"][-1])
            + "  real-vs-hybrid acc "
            + " ".join("  -  " if v is None else f"{100 * v:.1f}" for v in hist["accuracy"][-1])
            + f"  {seconds:.1f} s  elapsed {elapsed:.0f} s  eta {eta:.0f} s", flush=True)
        if callback is not None:
            callback(epoch, state)
    return state

# -----------------------------------------------------------------------------
# Softmax head on the frozen network

def extract_features(weights, biases, x, top_k=3, chunk=2000):
    """concat(L2norm(h_l)) over the top_k layers, float32, computed chunk by chunk."""
    sizes = [W.shape[1] for W in weights[-top_k:]]
    features = np.empty((len(x), sum(sizes)), np.float32)
    for start in range(0, len(x), chunk):
        hs = network_activities(weights, biases, x[start:start + chunk])
        rows = features[start:start + chunk]
        col = 0
        for h in hs[-top_k:]:
            l2_normalize(h, out=rows[:, col:col + h.shape[1]])
            col += h.shape[1]
    return features


def softmax_loss_and_grads(F, y, W, b, weight_decay=0.0):
    """Mean cross-entropy of softmax(F W + b) plus (weight_decay/2)||W||^2, and its gradient.

    dL/dlogits = (softmax - onehot) / n; returns loss, dW, db, logits.
    """
    logits = F @ W
    logits += b
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p_sum = p.sum(axis=1)
    rows = np.arange(len(y))
    loss = (np.log(p_sum).mean() - shifted[rows, y].mean()
            + 0.5 * weight_decay * np.vdot(W, W))
    p /= p_sum[:, None]
    p[rows, y] -= 1
    p /= len(y)
    dW = F.T @ p
    dW += weight_decay * W
    return loss, dW, p.sum(axis=0), logits


def error_rate(F, y, W, b, chunk=10000):
    wrong = sum(int(np.sum(np.argmax(F[s:s + chunk] @ W + b, axis=1) != y[s:s + chunk]))
                for s in range(0, len(y), chunk))
    return wrong / len(y)


def train_softmax(F_train, y_train, F_test, y_test, rng, n_epochs=50, lr=0.05,
                  weight_decay=1e-4, batch_size=256, n_classes=10, log=print,
                  F_val=None, y_val=None):
    """Minibatch SGD on the linear softmax. The per-epoch train error is the running error
    of the minibatches during the epoch (an extra full pass per epoch would cost as much
    as the training itself); validation (if given) and test error are exact, after each
    epoch. Settings are chosen on the validation error, never on the test error."""
    W = np.zeros((F_train.shape[1], n_classes), np.float32)
    b = np.zeros(n_classes, np.float32)
    hist = {"train_error": [], "test_error": [], "loss": [], "seconds": []}
    if F_val is not None:
        hist["val_error"] = []
    n = len(y_train)
    for epoch in range(n_epochs):
        t0 = time.perf_counter()
        perm = rng.permutation(n)
        wrong, loss_sum = 0, 0.0
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            yb = y_train[idx]
            loss, dW, db, logits = softmax_loss_and_grads(F_train[idx], yb, W, b, weight_decay)
            W -= lr * dW
            b -= lr * db
            wrong += int(np.sum(np.argmax(logits, axis=1) != yb))
            loss_sum += float(loss) * len(idx)
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
                f"train error {100 * hist['train_error'][-1]:.2f}%  {val}"
                f"test error {100 * hist['test_error'][-1]:.2f}%", flush=True)
    return W, b, hist


# -----------------------------------------------------------------------------
# Run artefacts: model.npz, history.json, metrics.json, checkpoint.npz

def environment():
    env = {"python": platform.python_version(), "numpy": np.__version__,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "cpu": platform.processor()}
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


def write_json(path, obj):
    def plain(o):  # numpy scalars and arrays as JSON numbers and lists
        return o.tolist() if isinstance(o, (np.generic, np.ndarray)) else str(o)
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=plain).encode()))


def save_checkpoint(run_dir, cfg, state):
    arrays = {"epochs_done": state.epochs_done,
              "rng_state": json.dumps(state.rng.bit_generator.state),
              "config": json.dumps(asdict(cfg)), "history": json.dumps(state.history)}
    for l, (W, b) in enumerate(zip(state.weights, state.biases)):
        arrays.update({f"W{l}": W, f"b{l}": b, f"peer{l}": state.peer_means[l]})
        for name, adam in (("W", state.adam_w[l]), ("b", state.adam_b[l])):
            arrays.update({f"adam_{name}{l}_m": adam.m_acc, f"adam_{name}{l}_v": adam.v_acc,
                           f"adam_{name}{l}_t": adam.t})
    atomic_write(os.path.join(run_dir, "checkpoint.npz"), lambda f: np.savez(f, **arrays))


def load_checkpoint(run_dir):
    """(cfg, state) saved after the last finished epoch of the run in run_dir."""
    path = os.path.join(run_dir, "checkpoint.npz")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: nothing to resume")
    with np.load(path) as z:
        raw = json.loads(str(z["config"]))
        cfg = FFConfig(**{**raw, "layer_sizes": tuple(raw["layer_sizes"])})
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(z["rng_state"]))
        state = FFState.fresh(cfg, np.random.default_rng(0))
        state.rng, state.epochs_done = rng, int(z["epochs_done"])
        state.history = json.loads(str(z["history"]))
        for l in range(len(state.weights)):
            state.weights[l][...], state.biases[l][...] = z[f"W{l}"], z[f"b{l}"]
            state.peer_means[l][...] = z[f"peer{l}"]
            for name, adam in (("W", state.adam_w[l]), ("b", state.adam_b[l])):
                adam.load_state(z[f"adam_{name}{l}_m"], z[f"adam_{name}{l}_v"],
                                z[f"adam_{name}{l}_t"])
    return cfg, state


def save_run(run_dir, cfg, state, head, top_k, softmax_history, args, metrics):
    arrays = {"layer_sizes": np.array(cfg.layer_sizes), "top_k": top_k,
              "config": json.dumps(asdict(cfg))}
    for l, (W, b) in enumerate(zip(state.weights, state.biases)):
        arrays.update({f"W{l}": W, f"b{l}": b})
    if head is not None:
        arrays.update({"softmax_W": head[0], "softmax_b": head[1]})
    atomic_write(os.path.join(run_dir, "model.npz"), lambda f: np.savez(f, **arrays))
    write_json(os.path.join(run_dir, "history.json"),
               {"ff": state.history, "softmax": softmax_history, "args": args,
                "config": asdict(cfg), "environment": environment()})
    write_json(os.path.join(run_dir, "metrics.json"), metrics)


def load_run(run_dir):
    """A saved run: .cfg, .weights, .biases, .head ((W, b) or None), .top_k, .ff_history,
    .softmax_history, .args, .metrics, .environment."""
    from types import SimpleNamespace
    with np.load(os.path.join(run_dir, "model.npz")) as z:
        raw = json.loads(str(z["config"]))
        cfg = FFConfig(**{**raw, "layer_sizes": tuple(raw["layer_sizes"])})
        n_layers = len(cfg.layer_sizes) - 1
        weights = [z[f"W{l}"] for l in range(n_layers)]
        biases = [z[f"b{l}"] for l in range(n_layers)]
        head = (z["softmax_W"], z["softmax_b"]) if "softmax_W" in z else None
        top_k = int(z["top_k"])
    with open(os.path.join(run_dir, "history.json")) as f:
        history = json.load(f)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    return SimpleNamespace(cfg=cfg, weights=weights, biases=biases, head=head, top_k=top_k,
                           ff_history=history["ff"], softmax_history=history["softmax"],
                           args=history["args"], environment=history["environment"],
                           metrics=metrics, run_dir=run_dir)


# -----------------------------------------------------------------------------
# CLI

N_TRAIN_MAX = 60000


def number_arg(kind, low, inclusive=True):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not np.isfinite(value) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low}")
        return value
    return parse


def layer_sizes_arg(text):
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if len(sizes) < 2 or sizes[0] != 784:
        raise argparse.ArgumentTypeError(f"{text} must start with 784 (the input) and have at "
                                         "least one layer, e.g. 784,1000,1000,1000,1000")
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text}: every layer needs at least 1 unit")
    return sizes


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = FFConfig()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-epochs", type=number_arg(int, 0), default=d.n_epochs,
                   help="FF epochs (per layer with --schedule greedy)")
    p.add_argument("--layer-sizes", type=layer_sizes_arg, default=d.layer_sizes,
                   help="comma-separated, input first")
    p.add_argument("--batch-size", type=number_arg(int, 1), default=d.batch_size,
                   help="positives per batch (as many hybrids are added)")
    p.add_argument("--lr", type=number_arg(float, 0, inclusive=False), default=d.lr)
    p.add_argument("--threshold", type=number_arg(float, 0, inclusive=False), default=d.threshold,
                   help="goodness threshold theta (for --goodness mean)")
    p.add_argument("--n-train", type=number_arg(int, 1), default=None,
                   help="use the first N training digits (default: all those not held out "
                        "by --val-size)")
    p.add_argument("--val-size", type=number_arg(int, 0), default=0,
                   help="hold out the last N of the 60000 training digits as a validation "
                        "split, from FF training and the head; its error is reported beside "
                        "the test error")
    p.add_argument("--softmax-epochs", type=number_arg(int, 0), default=50, help="0 skips the head")
    p.add_argument("--softmax-lr", type=number_arg(float, 0, inclusive=False), default=0.05)
    p.add_argument("--softmax-weight-decay", type=number_arg(float, 0), default=1e-4)
    p.add_argument("--n-blur", type=number_arg(int, 0), default=d.n_blur,
                   help="blur passes of the hybrid mask")
    p.add_argument("--top-k", type=number_arg(int, 1), default=3,
                   help="layers whose activities feed the softmax")
    p.add_argument("--weight-decay", type=number_arg(float, 0), default=d.weight_decay,
                   help="L2 weight decay of the FF weights (in Adam's gradient; 1e-4 already "
                        "silenced every unit at lr 0.03, see README)")
    p.add_argument("--goodness", choices=("mean", "sum"), default=d.goodness,
                   help="sum uses threshold * n_units, so both agree on every input")
    p.add_argument("--peer-norm", type=number_arg(float, 0), default=d.peer_norm,
                   help="peer-normalisation coefficient, 0 = off")
    p.add_argument("--schedule", choices=("parallel", "greedy"), default=d.schedule)
    p.add_argument("--lr-decay", choices=("none", "linear-half"), default=d.lr_decay)
    p.add_argument("--refresh-inputs", action="store_true",
                   help="feed each layer the output of the updated layer below (a second "
                        "forward pass per layer)")
    p.add_argument("--data-dir", help="folder with the four MNIST files (else $MNIST_DIR, "
                                      "the repository's data/mnist, the cache, a download)")
    p.add_argument("--out", help="run folder (default runs/<timestamp>)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR up to --n-epochs; every other setting is the run's own")
    return p


def parse_args(argv=None, parser=None):
    """Parsed and cross-checked training flags; `parser` may extend build_parser()'s."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    n_layers = len(args.layer_sizes) - 1
    if args.top_k > n_layers:
        parser.error(f"--top-k {args.top_k} exceeds the {n_layers} layers of --layer-sizes")
    if args.val_size >= N_TRAIN_MAX:
        parser.error(f"--val-size {args.val_size} leaves none of the {N_TRAIN_MAX} "
                     "training digits to train on")
    if args.n_train is None:
        args.n_train = N_TRAIN_MAX - args.val_size
    if args.n_train + args.val_size > N_TRAIN_MAX:
        parser.error(f"--n-train {args.n_train} and --val-size {args.val_size} together "
                     f"exceed the {N_TRAIN_MAX} training digits")
    if args.batch_size > args.n_train:
        parser.error(f"--batch-size {args.batch_size} exceeds --n-train {args.n_train}")
    if args.resume and args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        parser.error("--resume writes into its own folder; leave out --out")
    return args


def config_from_args(args):
    return FFConfig(layer_sizes=tuple(args.layer_sizes), n_epochs=args.n_epochs,
                    batch_size=args.batch_size, lr=args.lr, threshold=args.threshold,
                    n_blur=args.n_blur, weight_decay=args.weight_decay, goodness=args.goodness,
                    peer_norm=args.peer_norm, schedule=args.schedule, lr_decay=args.lr_decay,
                    refresh_inputs=args.refresh_inputs)


def run(args, log=print, callback=None):
    """The whole experiment for parsed CLI args; returns the metrics dict (with run_dir)."""
    run_dir = args.resume or args.out or os.path.join(
        "runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if not args.resume and any(os.path.exists(os.path.join(run_dir, f))
                               for f in ("model.npz", "checkpoint.npz")):
        raise DataError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    if args.resume:
        # the run's own settings; only --n-epochs (and where the data is) come from this call
        cfg, state = load_checkpoint(run_dir)
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
        saved.setdefault("val_size", 0)  # runs saved before the validation split
        saved.update(n_epochs=args.n_epochs, resume=args.resume, data_dir=args.data_dir)
        args = argparse.Namespace(**saved)
        cfg.n_epochs = args.n_epochs
        log(f"resuming {run_dir} after epoch {state.epochs_done}")
    else:
        cfg = config_from_args(args)
        state = FFState.fresh(cfg, np.random.default_rng(args.seed))
    x_train, y_train, x_test, y_test = load_mnist(args.data_dir)
    x_train, y_train, x_val, y_val = split_validation(x_train, y_train, args.val_size,
                                                      args.n_train)
    if not args.resume:
        os.makedirs(run_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "args.json"), vars(args))
    log(f"run folder {run_dir}; {len(x_train)} training digits; layers "
        f"{'-'.join(map(str, cfg.layer_sizes))}; {total_epochs(cfg)} FF epochs")

    def after_epoch(epoch, state):
        save_checkpoint(run_dir, cfg, state)
        if callback is not None:
            callback(epoch, state)

    t0 = time.perf_counter()
    train_ff(x_train, cfg, state, callback=after_epoch, log=log)
    ff_seconds = sum(state.history["seconds"])
    head, softmax_history, metrics = None, None, {}
    if args.softmax_epochs > 0:
        t1 = time.perf_counter()
        F_train = extract_features(state.weights, state.biases, x_train, args.top_k)
        F_test = extract_features(state.weights, state.biases, x_test, args.top_k)
        F_val = (extract_features(state.weights, state.biases, x_val, args.top_k)
                 if len(x_val) else None)
        feature_seconds = time.perf_counter() - t1
        W, b, softmax_history = train_softmax(
            F_train, y_train, F_test, y_test, np.random.default_rng([args.seed, 1]),
            args.softmax_epochs, args.softmax_lr, args.softmax_weight_decay, log=log,
            F_val=F_val, y_val=y_val if len(x_val) else None)
        head = (W, b)
        if F_val is not None:
            metrics["val_error"] = error_rate(F_val, y_val, W, b)
        metrics.update(test_error=error_rate(F_test, y_test, W, b),
                       train_error=error_rate(F_train, y_train, W, b),
                       softmax_seconds=time.perf_counter() - t1,
                       feature_seconds=feature_seconds)
        del F_train, F_test, F_val
    last = lambda key: state.history[key][-1] if state.history[key] else None
    metrics.update(real_vs_hybrid_accuracy=last("accuracy"), ff_loss=last("loss"),
                   ff_seconds=ff_seconds, ff_epochs=state.epochs_done,
                   total_seconds=time.perf_counter() - t0, peak_rss_mib=peak_rss_mib(),
                   run_dir=run_dir)
    save_run(run_dir, cfg, state, head, args.top_k, softmax_history, vars(args), metrics)
    if "test_error" in metrics:
        val = (f"val error {100 * metrics['val_error']:.2f}%  "
               if "val_error" in metrics else "")
        log(f"{val}test error {100 * metrics['test_error']:.2f}%  train error "
            f"{100 * metrics['train_error']:.2f}%  FF {ff_seconds:.0f} s  "
            f"softmax {metrics['softmax_seconds']:.1f} s  -> {run_dir}")
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
