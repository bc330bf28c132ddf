"""Forward-Forward with the label in the image (Hinton 2022, section 3.3), supervised.

A positive is a digit with its own label written into its first 10 pixels (always blank in
MNIST), a negative the same digit with a wrong label. After training, a digit is classified
by running it with each of the ten labels and taking the label whose input gives the most
goodness, summed over the layers from layer 2 up (the paper's read-out). Wrong labels are
drawn uniformly, or as the network prefers them (hard negatives): from the goodness read-out
at each epoch's start, or batch by batch from a linear softmax head trained along with FF
on the digits with the neutral label (the author's Matlab recipe, which also uses the
smoothed-gradient SGD, RMS normalisation, his peer term and fan-in init of
ff_hybrid_mnist.py: see docs/rows.md for the recipe's flags).

Everything else is ff_hybrid_mnist.py's: this script hands its one training loop the label
batches (LabelConfig.batches) and adds the goodness read-out to the run's metrics.

    python3 ff_label_mnist.py --goodness sum --threshold 1 --hard-negatives --seed 1
"""

import sys
import time
from dataclasses import dataclass

import numpy as np

if __name__ == "__main__":  # one module, however it was started: ff_runs imports it by name
    sys.modules.setdefault("ff_label_mnist", sys.modules[__name__])

import ff_runs  # noqa: E402
from ff_devices import to_host, xp_of  # noqa: E402
from ff_hybrid_mnist import (FFConfig, N_CLASSES, SmoothedSGD, error_rate,  # noqa: E402
                             extract_features, goodness, learning_rate, network_activities,
                             softmax_loss_and_grads)
from ff_runs import TrainingDiverged, option  # noqa: E402

HARD_FROM = ("goodness", "head")


# -----------------------------------------------------------------------------
# The label in the image

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
                         kinds=cfg.layer_kinds())
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
                                    cfg.first_readout_layer, norm=cfg.normalize,
                                    kinds=cfg.layer_kinds())
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
                       norm="l2", kinds=None):
    """(n, 10) float64: each digit run once with each label, its goodness summed over the
    layers from first_layer (1-based) up. The paper leaves out layer 1 (first_layer=2)."""
    xp = xp_of(*weights)
    scores = xp.zeros((len(x), N_CLASSES))
    buf = xp.empty((min(chunk, len(x)), x.shape[1]), np.float32)
    for start in range(0, len(x), chunk):
        rows = xp.asarray(x[start:start + chunk])
        for label in range(N_CLASSES):
            labelled = embed_labels(rows, np.full(len(rows), label), out=buf[:len(rows)])
            hs = network_activities(weights, biases, labelled, norm=norm, kinds=kinds)
            scores[start:start + len(rows), label] = sum(
                goodness(h, goodness_kind) for h in hs[first_layer - 1:])
    return scores


def goodness_error_rate(weights, biases, x, y, goodness_kind="mean", first_layer=2, norm="l2",
                        kinds=None):
    """Error of predicting the label with the highest accumulated goodness."""
    scores = goodness_per_label(weights, biases, x, goodness_kind, first_layer, norm=norm,
                                kinds=kinds)
    xp = xp_of(scores)
    return float(xp.mean(xp.argmax(scores, axis=1) != xp.asarray(y)))




def label_read_outs(state, cfg, splits, log=print):
    """A label run's read-outs on each (name, x, y) of splits, as metrics: the paper's (the
    label whose input gives the most goodness) and, with a hard-negative head, the author's
    (that head on the neutral label)."""
    metrics, t0 = {}, time.perf_counter()
    first, n_layers = cfg.first_readout_layer, len(cfg.layer_sizes) - 1
    for name, xs, ys in splits:
        metrics[f"goodness_{name}_error"] = goodness_error_rate(
            state.weights, state.biases, xs, ys, cfg.goodness, first, cfg.normalize,
            cfg.layer_kinds())
        if state.head is not None:
            F = extract_features(state.weights, state.biases, embed_labels(xs, None),
                                 n_layers - first + 1, norm=cfg.normalize,
                                 kinds=cfg.layer_kinds())
            metrics[f"hard_head_{name}_error"] = error_rate(F, ys, *state.head)
    metrics["goodness_seconds"] = time.perf_counter() - t0
    for key, what in (("goodness", "goodness read-out"),
                      ("hard_head", "hard-negative head on the neutral label")):
        if f"{key}_test_error" in metrics:
            log(f"{what}: " + "  ".join(f"{name} error {100 * metrics[f'{key}_{name}_error']:.2f}%"
                                        for name, _, _ in splits), flush=True)
    return metrics



# -----------------------------------------------------------------------------
# The configuration: the base one, its label fields and its seams

@dataclass
class LabelConfig(FFConfig):
    """Forward-Forward with the label in the image (Hinton 2022, section 3.3), supervised."""
    SCRIPT = "ff_label_mnist.py"
    negatives = "label"
    ACCURACY_KEY, ACCURACY_NAME = "pos_vs_neg_accuracy", "right-vs-wrong-label"

    goodness_layer1: bool = option(False, "the goodness read-out also sums layer 1")
    hard_negatives: bool = option(False, "each digit's wrong label drawn with probability "
                                  "softmax(scores) over the nine wrong labels, the scores from "
                                  "--hard-from")
    hard_from: str = option("goodness", "with --hard-negatives: goodness: the goodness "
                            "read-out of every training digit at the epoch's start (about one "
                            "forward pass per label); head: batch by batch, a linear softmax "
                            "on the activities of the digit with the neutral label, trained "
                            "along (the author's; about one forward pass; with --optimizer sgd "
                            "it steps as the FF layers do, its rate decayed with theirs)",
                            choices=HARD_FROM)
    hard_head_lr: float = option(0.1, "with --hard-from head: that head's learning rate",
                                 low=0, above=True)
    hard_head_weight_decay: float = option(0.0, "with --hard-from head and --optimizer sgd: "
                                           "that head's weight cost", low=0)

    @property
    def first_readout_layer(self):
        """1-based: the goodness read-out (and the hard-negative head) use this layer up."""
        return 1 if self.goodness_layer1 else 2

    def rules(self):
        n_layers, by_head = len(self.layer_sizes) - 1, self.hard_from == "head"
        defaults = {name: f.default for name, f in self.__dataclass_fields__.items()}
        return super().rules() + [
            ("n_blur", self.n_blur != defaults["n_blur"],
             "is unused: label negatives have no mask (ff_hybrid_mnist.py's hybrids have)"),
            ("hard_from", by_head and not self.hard_negatives, "needs --hard-negatives"),
            ("hard_head_lr", self.hard_head_lr != defaults["hard_head_lr"] and not by_head,
             "needs --hard-from head"),
            ("hard_head_weight_decay", self.hard_head_weight_decay > 0
             and (not by_head or self.optimizer != "sgd"),
             "needs --hard-from head and --optimizer sgd"),
            ("layer_sizes", n_layers < 2 and not self.goodness_layer1, "has one layer, and the "
             "goodness read-out starts at layer 2: give at least two layers, or "
             "--goodness-layer1")]

    def unused_fields(self):
        unused = {**super().unused_fields(), "n_blur": "ff_hybrid_mnist.py (a hybrid's mask)"}
        if not self.hard_negatives:
            unused["hard_from"] = "--hard-negatives"
        if self.hard_from != "head" or not self.hard_negatives:
            for name in ("hard_head_lr", "hard_head_weight_decay"):
                unused[name] = "--hard-negatives --hard-from head"
        return unused

    def batches(self, x_train, y_train, state, x):
        return label_batches(x_train, y_train, self, state, x)

    def read_outs(self, state, splits, log=print):
        return label_read_outs(state, self, splits, log)

    def head_input(self, x):
        return embed_labels(x, None)

    def fresh_head(self):
        if not (self.hard_negatives and self.hard_from == "head"):
            return None, None
        n_features = sum(self.layer_sizes[self.first_readout_layer:])
        head = [np.zeros((n_features, N_CLASSES), np.float32), np.zeros(N_CLASSES, np.float32)]
        head_opt = None
        if self.optimizer == "sgd":
            head_opt = [SmoothedSGD(head[0], weight_decay=self.hard_head_weight_decay),
                        SmoothedSGD(head[1])]
        return head, head_opt


def main(argv=None):
    return ff_runs.main(LabelConfig, argv)


if __name__ == "__main__":
    sys.exit(main())
