"""Backpropagation baseline: FF's ReLU MLP with a linear softmax output, trained end to end.

The hidden layers are FF's (784-1000x4 by default); a linear softmax layer on the last hidden
layer reads out the 10 classes, and every weight learns from the hand-derived gradient of the
mean cross-entropy, with Adam on batches of 100 digits. The input is the raw pixels in
[0, 1]: backprop needs no normalisation between layers, so none is added (FF L2-normalises
the input of every layer). The last --val-size training digits are the validation split; the
test set is read once, after training, with the parameters of the epoch of lowest
validation error (of the last epoch when there is no validation split).

    python3 -m experiments.baselines.backprop_baseline --layer-sizes 784,100,100 --n-epochs 2
    python3 -m experiments.baselines.backprop_baseline --lr 1e-3 --n-epochs 20 --seed 0 \\
        --out experiments/results/backprop-baseline.jsonl
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

import ff_hybrid_mnist as ff
import ff_runs
from experiments.records import OneLineParser, RecordsError, check_out

N_CLASSES = 10


@dataclass
class BPConfig:
    """Everything a run depends on, checked on construction (ValueError, one line)."""
    layer_sizes: tuple = field(default=(784, 1000, 1000, 1000, 1000), metadata=dict(
        help="input and hidden layers, comma-separated (the softmax layer's 10 are added)"))
    lr: float = field(default=1e-3, metadata=dict(help="Adam step size"))
    n_epochs: int = field(default=20, metadata=dict(help="passes over the training digits"))
    batch_size: int = field(default=100, metadata=dict(help="digits per step"))
    seed: int = field(default=0, metadata=dict(help="seeds the weights and the batches"))
    val_size: int = field(default=10000, metadata=dict(
        help="hold out the last N training digits for validation; 0: none"))
    n_train: int = field(default=None, metadata=dict(
        help="train on the first N digits of the rest (default: all of it)"))

    def __post_init__(self):
        self.layer_sizes = tuple(self.layer_sizes)
        if (len(self.layer_sizes) < 2 or self.layer_sizes[0] != 784
                or min(self.layer_sizes) < 1):
            raise ValueError(f"--layer-sizes {','.join(map(str, self.layer_sizes))} must start "
                             "with 784 and hold at least one hidden layer of >= 1 unit")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr {self.lr} must be a positive number")
        for name, low in (("n_epochs", 0), ("batch_size", 1), ("seed", 0), ("val_size", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be "
                                 f">= {low}")
        pool = ff.N_TRAIN_MAX - self.val_size
        if pool < 1:
            raise ValueError(f"--val-size {self.val_size} leaves none of the "
                             f"{ff.N_TRAIN_MAX} training digits to train on")
        if self.n_train is None:
            self.n_train = pool
        if not 1 <= self.n_train <= pool:
            raise ValueError(f"--n-train {self.n_train} must be between 1 and the {pool} "
                             f"digits that --val-size {self.val_size} leaves")
        if self.batch_size > self.n_train:
            raise ValueError(f"--batch-size {self.batch_size} exceeds the {self.n_train} "
                             "training digits")


# -----------------------------------------------------------------------------
# The network: forward, hand-derived backward pass, initialisation

def init_mlp(layer_sizes, rng, n_classes=N_CLASSES):
    """He initialisation, W ~ N(0, 2 / fan_in), so that a ReLU layer keeps the scale of its
    input; the softmax layer N(0, 1 / fan_in); biases 0. float32."""
    sizes = tuple(layer_sizes) + (n_classes,)
    weights, biases = [], []
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        gain = 1.0 if l == len(sizes) - 2 else 2.0
        weights.append((rng.standard_normal((n_in, n_out)) * np.sqrt(gain / n_in))
                       .astype(np.float32))
        biases.append(np.zeros(n_out, np.float32))
    return weights, biases


def forward(weights, biases, x):
    """(hs, logits): hs = [x, h_1, ..., h_L], the input and every hidden layer's activities
    h = ReLU(h_below W + b); the logits are linear in h_L."""
    hs = [x]
    for W, b in zip(weights[:-1], biases[:-1]):
        hs.append(ff.layer_forward(hs[-1], W, b))
    logits = hs[-1] @ weights[-1]
    logits += biases[-1]
    return hs, logits


def loss_and_grads(weights, biases, x, y):
    """Mean cross-entropy of softmax(logits) and its gradient for every W and b.

    softmax_loss_and_grads returns the gradient of a linear layer's W; given the identity as
    that layer's input, its W is the logits, so that gradient is dL/dlogits. From there the
    chain rule, layer by layer downwards, with z = h_below W + b:
        dL/dW = h_below^T dL/dz,  dL/db = sum over rows of dL/dz,
        dL/dh_below = dL/dz W^T,  dL/dz_below = dL/dh_below * [z_below > 0],
    and h_below > 0 exactly where z_below > 0 (ReLU).
    """
    hs, logits = forward(weights, biases, x)
    identity = np.eye(len(x), dtype=logits.dtype)
    loss, dz, _, _ = ff.softmax_loss_and_grads(identity, y, logits,
                                               np.zeros(logits.shape[1], logits.dtype))
    grads_W, grads_b = [None] * len(weights), [None] * len(weights)
    for l in reversed(range(len(weights))):
        grads_W[l] = hs[l].T @ dz
        grads_b[l] = dz.sum(axis=0)
        if l > 0:  # the input needs no gradient
            dz = dz @ weights[l].T
            dz *= hs[l] > 0
    return loss, grads_W, grads_b


def error_rate(weights, biases, x, y, chunk=10000):
    """Fraction of rows of x whose largest logit is not their label."""
    wrong = 0
    for s in range(0, len(x), chunk):
        _, logits = forward(weights, biases, x[s:s + chunk])
        wrong += int(np.sum(logits.argmax(axis=1) != y[s:s + chunk]))
    return wrong / len(x)


# -----------------------------------------------------------------------------
# Training: Adam on every parameter, val error after each epoch, the best epoch kept

def train_backprop(cfg, x_fit, y_fit, x_val=None, y_val=None, log=print, every=None,
                   callback=None):
    """(weights, biases, history) after cfg.n_epochs, the parameters those of the epoch of
    lowest validation error (the last epoch without validation digits). history: per epoch
    the mean training loss, the validation error and the seconds; "chosen_epoch" (1-based).
    callback(step, weights, biases) runs after every `every` steps (and after step 0)."""
    rng = np.random.default_rng(cfg.seed)
    weights, biases = init_mlp(cfg.layer_sizes, rng)
    adams = [ff.Adam(p) for p in weights + biases]
    has_val = x_val is not None and len(x_val) > 0
    history = {"loss": [], "val_error": [], "seconds": [], "chosen_epoch": cfg.n_epochs}
    best = (np.inf, [W.copy() for W in weights], [b.copy() for b in biases])
    n_batches, step = len(x_fit) // cfg.batch_size, 0
    if callback is not None:
        callback(0, weights, biases)
    for epoch in range(cfg.n_epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(x_fit))
        loss_sum = 0.0
        for i in range(n_batches):
            rows = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss, grads_W, grads_b = loss_and_grads(weights, biases, x_fit[rows], y_fit[rows])
            if not np.isfinite(loss):
                raise ff.TrainingDiverged(f"loss is {loss} in epoch {epoch + 1}, batch "
                                          f"{i + 1}; try a lower --lr")
            for adam, p, g in zip(adams, weights + biases, grads_W + grads_b):
                adam.step(p, g, cfg.lr)
            loss_sum += float(loss)
            step += 1
            if callback is not None and every and step % every == 0:
                callback(step, weights, biases)
        history["loss"].append(loss_sum / n_batches)
        history["seconds"].append(time.perf_counter() - t0)
        line = f"epoch {epoch + 1:3d}/{cfg.n_epochs}  loss {history['loss'][-1]:.4f}"
        if has_val:
            val_error = error_rate(weights, biases, x_val, y_val)
            history["val_error"].append(val_error)
            line += f"  val error {100 * val_error:.2f}%"
            if val_error < best[0]:
                best = (val_error, [W.copy() for W in weights], [b.copy() for b in biases])
                history["chosen_epoch"] = epoch + 1
        log(f"{line}  {history['seconds'][-1]:.1f} s", flush=True)
    if has_val and cfg.n_epochs > 0:
        weights, biases = best[1], best[2]
    return weights, biases, history


# -----------------------------------------------------------------------------
# CLI: flags from BPConfig, one line per error, a JSON record per run

def build_parser():
    p = OneLineParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(BPConfig):
        kind = {"layer_sizes": ff_runs.layer_sizes_arg, "lr": float}.get(f.name, int)
        default = ",".join(map(str, f.default)) if f.name == "layer_sizes" else f.default
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=f.metadata["help"])
    p.add_argument("--out", help="append the run's JSON record to this file (JSON lines); "
                                 "it is printed in any case")
    p.add_argument("--label", help="a name stored in the record (a sweep list's first word)")
    p.add_argument("--data-dir", help="folder with the four MNIST files (see the module)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        cfg = BPConfig(**{f.name: getattr(args, f.name) for f in fields(BPConfig)})
    except ValueError as e:
        p.error(str(e))
    if args.out:  # a folder that is missing would lose the record after the training
        try:
            check_out(args.out)
        except RecordsError as e:
            p.error(str(e))
    t0 = time.perf_counter()
    try:
        x_train, y_train, x_test, y_test = ff.load_mnist(args.data_dir)
        x_fit, y_fit, x_val, y_val = ff.split_validation(x_train, y_train, cfg.val_size,
                                                         cfg.n_train)
        print(f"backprop {'-'.join(map(str, cfg.layer_sizes))}-{N_CLASSES}, {len(x_fit)} "
              f"training digits, {len(x_val)} validation, lr {cfg.lr:g}", flush=True)
        weights, biases, history = train_backprop(cfg, x_fit, y_fit, x_val, y_val)
    except (ff.DataError, ff.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = {"test_error": error_rate(weights, biases, x_test, y_test),
               "val_error": (history["val_error"][history["chosen_epoch"] - 1]
                             if history["val_error"] else None),
               "train_error": error_rate(weights, biases, x_fit, y_fit),
               "chosen_epoch": history["chosen_epoch"],
               "train_seconds": sum(history["seconds"])}
    record = {"label": args.label, "config": asdict(cfg), "metrics": metrics, "history": history,
              "wall_seconds": time.perf_counter() - t0,
              "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
              "command": "python3 -m experiments.baselines.backprop_baseline " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "environment": ff_runs.environment()}
    val = (f"val error {100 * metrics['val_error']:.2f}% (epoch {metrics['chosen_epoch']})  "
           if metrics["val_error"] is not None else "")
    print(f"{val}test error {100 * metrics['test_error']:.2f}%  train error "
          f"{100 * metrics['train_error']:.2f}%  {record['wall_seconds']:.0f} s", flush=True)
    text = json.dumps(ff_runs.finite_or_none(record))
    if args.out:
        return append_record(args.out, text)
    print(text)
    return 0


def append_record(path, text):
    """Append the record; if that fails (the disk full, the folder removed while training),
    print it instead, so that the run is not lost with it."""
    try:
        with open(path, "a") as f:
            f.write(text + "\n")
    except OSError as e:
        print(text)
        print(f"error: could not append the record to {path} ({e.strerror or e}); it is "
              "printed above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
