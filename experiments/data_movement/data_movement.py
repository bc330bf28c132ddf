"""Data movement (ByteDMD) of FF and of backprop on the same network: per step, and to a
validation error.

Each step is written as the element-level operations of the numpy code
(experiments/data_movement/bytedmd.py prices them): FF as ff_hybrid_mnist.train_ff runs a
batch (the stacked positives and negatives L2-normalised, then per layer: forward, goodness,
loss, the hand-derived local gradient, Adam on W and b, the L2 normalisation for the layer
above); backprop as experiments/baselines/backprop_baseline.py runs one (forward, softmax
cross-entropy, backward pass, Adam on every parameter). The order of the operations is a
schedule (schedules.py): numpy's, or the ones that suit each algorithm. The answer
(docs/data-movement.md) comes from two subcommands and the records they read:

    python3 -m experiments.data_movement.data_movement schedules --widths 64 128 \
        --batches 1 10 100 --out experiments/results/data-movement-schedules.jsonl
    python3 -m experiments.data_movement.data_movement curves --widths 64 \
        --ff-lrs 0.01 0.03 0.1 --bp-lrs 0.0003 0.001 0.003 --out curves-64.json
    python3 -m experiments.data_movement.data_movement to-error --curves curves-64.json \
        --schedules experiments/results/data-movement-schedules.jsonl --targets 0.12 0.1 \
        --out to-error.json --figure to-error.png

grid, steps, batch, plot and tables are the first round's measurements (numpy's order,
the tracer's earlier rules).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

import ff_hybrid_mnist as ff
import ff_devices
import ff_runs
from experiments.baselines import backprop_baseline as bp
from experiments.data_movement import bytedmd
from experiments.data_movement.schedules import NUMPY, SCHEDULES, fused_adam
from experiments.records import (OneLineParser, RecordsError, check_figure, check_out, main_of,
                                 mismatch, read_json, read_text)

# what each record's "command" starts with: this module, run from the repository root
COMMAND = "python3 -m experiments.data_movement.data_movement"

LABEL_BYTES, MASK_BYTES = 8, 1

# -----------------------------------------------------------------------------
# Shared pieces: Adam, the L2 normalisation, a layer's forward pass


def adam(t, p, g, m, v, schedule=NUMPY):
    """Module's Adam step, as adam_cpu runs it on each chunk of ADAM_CHUNK elements: ten
    passes (m *= b1, m += g, v *= b2, tmp = g g, v += tmp, tmp = sqrt v, tmp += eps,
    tmp = m / tmp, tmp *= step, p -= tmp); no weight decay, no flush. Returns the new
    (p, m, v). A schedule with the fused Adam makes one pass (schedules.fused_adam)."""
    if schedule.adam == "fused":
        return fused_adam(t, p, g, m, v)
    shape = p.shape
    p, g, m, v = (a.ravel() for a in (p, g, m, v))
    new = []
    for lo in range(0, len(p), ff_devices.ADAM_CHUNK):
        c = slice(lo, lo + ff_devices.ADAM_CHUNK)
        m1 = t.op("update", t.op("update", m[c]), g[c])
        v1 = t.op("update", t.op("update", v[c]), t.op("update", g[c], g[c]))
        tmp = t.op("update", t.op("update", v1))
        tmp = t.op("update", t.op("update", m1, tmp))
        new.append((t.op("update", p[c], tmp), m1, v1))
    return tuple(np.concatenate(parts).reshape(shape) for parts in zip(*new))


def l2_normalize(t, X, phase="l2norm"):
    """Module's l2_normalize: norm = sqrt(einsum(x, x)), norm += eps, x / norm."""
    norm = t.op(phase, t.op(phase, t.dot_rows(phase, X, X)))
    return t.op(phase, X, norm[:, None])


def layer_forward(t, X, W, b, phase="forward", schedule=NUMPY):
    """Module's layer_forward: x @ W, += b, ReLU."""
    Z = t.op(phase, schedule.matmul(t, phase, X, W), b[None, :])
    return t.op(phase, Z)


def network_arguments(t, sizes):
    """Arguments of a network with these layer sizes, in call order after the batch: each
    layer's W and b, then the Adam moments (m, v) of each W and b in the same order."""
    params = [(t.argument((a, b)), t.argument((b,))) for a, b in zip(sizes[:-1], sizes[1:])]
    moments = [[(t.argument(p.shape), t.argument(p.shape)) for p in layer] for layer in params]
    return params, moments


def softmax_cross_entropy(t, logits, y, phase, grad_phase, decay_of=None):
    """dL/dlogits as softmax_loss_and_grads computes it, the loss on the way: row max, shift,
    exp, row sum, log, mean, the label's shifted logit, mean, difference (plus
    0.5 wd |W|^2 for decay_of=W), then p / sum, p[label] -= 1, p / n. Rows take the labels
    0, 1, 2, ... in turn (y holds the label values)."""
    n, n_classes = logits.shape
    rows, label = np.arange(n), np.arange(n) % n_classes
    shifted = t.op(phase, logits, t.max_rows(phase, logits)[:, None])
    p = t.op(phase, shifted)                                          # exp
    p_sum = t.sum_rows(phase, p)
    mean_log = t.op(phase, t.sum_rows(phase, t.op(phase, p_sum)[None, :]))  # log, sum, / n
    picked = t.op(phase, y, shifted[rows, label])                     # shifted[rows, y]
    loss = t.op(phase, mean_log, t.op(phase, t.sum_rows(phase, picked[None, :])))
    if decay_of is not None:
        flat = decay_of.reshape(1, -1)
        t.op(phase, loss, t.op(phase, t.dot_rows(phase, flat, flat)))  # + 0.5 wd vdot(W, W)
    p = t.op(grad_phase, p, p_sum[:, None])                           # p / sum
    p[rows, label] = t.op(grad_phase, y, p[rows, label])              # p[rows, y] -= 1
    return t.op(grad_phase, p)                                        # / n


# -----------------------------------------------------------------------------
# FF: one batch of train_ff


def hybrid_negatives(t, a, b, bits, blur):
    """Module's make_hybrid_batch for digit rows a and b, from the mask's random bits
    (n side x side blocks, as floats) and the blur matrix: bits @ B^T, a transposing copy,
    @ B^T, > 0.5 over the result in memory order, the copy that reshape makes of that
    transposed mask; then out = b, out[mask] = a."""
    n, side = len(a), len(blur)
    rows = t.matmul("negatives", bits, blur.T).reshape(n, side, side)
    copied = t.op("negatives", rows.transpose(0, 2, 1)).reshape(n * side, side)
    blurred = t.matmul("negatives", copied, blur.T).reshape(n, side, side)
    mask = t.op("negatives", blurred, size=MASK_BYTES).transpose(0, 2, 1)
    mask = t.op("negatives", mask, size=MASK_BYTES).reshape(n, side * side)
    return t.op("negatives", mask, a, t.op("negatives", b))


def ff_step(t, x, params, moments, normalize=True, schedule=NUMPY):
    """train_ff's work on one stacked batch x (positives, then as many negatives): per
    layer forward, goodness, loss, the hand-derived local gradient, Adam on W then b, and
    (for the layer above) the L2 normalisation of the layer's output from before its
    update; products and Adam as the schedule orders them. Returns the new params and
    moments."""
    B = len(x) // 2
    X = l2_normalize(t, x) if normalize else x
    new_params, new_moments = [], []
    for l, ((W, bias), ((mW, vW), (mb, vb))) in enumerate(zip(params, moments)):
        H = layer_forward(t, X, W, bias, schedule=schedule)
        # goodness (mean of h^2) and the FF loss, as layer_loss_and_grads computes them
        g = t.op("goodness", t.dot_rows("goodness", H, H))            # einsum, / n_units
        margin = t.op("loss", g)                                      # g - threshold
        margin = np.concatenate([t.op("loss", margin[:B]), margin[B:]])  # positives: * -1
        t.op("loss", t.sum_rows("loss", t.op("loss", margin)[None, :]))  # softplus, sum, / n
        # dL/dg = s sigmoid(s margin) / n_pos, sigmoid(t) = 0.5 (1 + tanh(0.5 t))
        d = margin
        for _ in range(4):
            d = t.op("gradient", d)
        d = t.op("gradient", d)                                       # / n_pos
        d = np.concatenate([t.op("gradient", d[:B]), d[B:]])          # positives: * -1
        dZ = t.op("gradient", H, t.op("gradient", d)[:, None])        # h * (scale dL/dg)
        dW = schedule.matmul(t, "gradient", X.T, dZ)
        db = t.sum_columns("gradient", dZ)
        W1, mW1, vW1 = adam(t, W, dW, mW, vW, schedule)
        b1, mb1, vb1 = adam(t, bias, db, mb, vb, schedule)
        new_params.append((W1, b1))
        new_moments.append(((mW1, vW1), (mb1, vb1)))
        if l + 1 < len(params):
            X = l2_normalize(t, H) if normalize else H
    return new_params, new_moments


def trace_ff_step(n_in, widths, batch, normalize=True, negatives=False, warmup=1,
                  rules=bytedmd.FUSED_FLOAT32_RULES, schedule=NUMPY):
    """The trace of FF steps on `batch` positives and `batch` negatives each: `warmup`
    steps whose phases are named "warm-up ...", then the step that is measured, which so
    finds the stack as training leaves it rather than as the arguments were pushed.

    normalize=False leaves out every L2 normalisation (each layer reads the raw activities
    below it): the counterfactual that prices what the normalisation costs. negatives=True
    also makes the negatives (hybrids of two other digits, the module's masks), else they
    are part of each step's batch argument like the positives. Arguments: each step's batch
    (or its positives, the two digits of each hybrid and the mask bits; then the blur
    matrix), then the network. rules: the tracer's (bytedmd.Trace); the new network is what
    the trace returns (kept on the stack to the end under the original's rules).
    """
    t = bytedmd.Trace(**rules)
    B, steps = batch, warmup + 1
    if negatives:
        side = math.isqrt(n_in)
        data = [[t.argument((B, n_in)) for _ in range(3)] + [t.argument((B * side, side))]
                for _ in range(steps)]
        blur = t.argument((side, side))
    else:
        data = [t.argument((2 * B, n_in)) for _ in range(steps)]  # positives, then negatives
    params, moments = network_arguments(t, (n_in,) + tuple(widths))
    for s in range(steps):
        t.phase_prefix = "warm-up " if s < warmup else ""
        if negatives:
            pos, a, b, bits = data[s]
            x = np.concatenate([pos, hybrid_negatives(t, a, b, bits, blur)])
        else:
            x = data[s]
        params, moments = ff_step(t, x, params, moments, normalize, schedule)
    t.returns(params, moments)
    return t


# -----------------------------------------------------------------------------
# Backprop: one batch of backprop_baseline.train_backprop


def backprop_step(t, x, y, params, moments, schedule=NUMPY):
    """train_backprop's work on one batch: forward, softmax cross-entropy, backward (per
    layer from the top: dW, db, then dL/dh below and its ReLU mask), Adam on every W, then
    every b (or, as the schedule says, each layer's W and b as soon as the backward pass has
    made their gradients); products and Adam as the schedule orders them. Returns the new
    params and moments."""
    hs = [x]
    for W, b in params[:-1]:
        hs.append(layer_forward(t, hs[-1], W, b, schedule=schedule))
    W_out, b_out = params[-1]
    logits = t.op("forward", schedule.matmul(t, "forward", hs[-1], W_out), b_out[None, :])
    dz = softmax_cross_entropy(t, logits, y, "loss", "backward")
    grads = [None] * len(params)
    new = [[None, None] for _ in params], [[None, None] for _ in params]

    def update(l, k):
        p, m, v = adam(t, params[l][k], grads[l][k], *moments[l][k], schedule)
        new[0][l][k], new[1][l][k] = p, (m, v)
    for l in reversed(range(len(params))):
        grads[l] = (schedule.matmul(t, "backward", hs[l].T, dz),
                    t.sum_columns("backward", dz))
        if l > 0:  # from the weights before their update
            dh = schedule.matmul(t, "backward", dz, params[l][0].T)
            dz = t.op("backward", dh, t.op("backward", hs[l], size=MASK_BYTES))
        if schedule.update == "as-made":  # this layer's W and b while their gradients are hot
            update(l, 0), update(l, 1)
    if schedule.update == "after":
        for k in (0, 1):  # every W, then every b
            for l in range(len(params)):
                update(l, k)
    return new


def trace_backprop_step(n_in, widths, batch, n_classes=bp.N_CLASSES, warmup=1,
                        rules=bytedmd.FUSED_FLOAT32_RULES, schedule=NUMPY):
    """The trace of backprop steps on `batch` digits each, `warmup` of them named
    "warm-up ..." before the measured one (as trace_ff_step). Arguments: each step's batch
    and labels, then the network with its softmax layer; the new network is returned."""
    t = bytedmd.Trace(**rules)
    data = [(t.argument((batch, n_in)), t.argument((batch,), size=LABEL_BYTES))
            for _ in range(warmup + 1)]
    params, moments = network_arguments(t, (n_in,) + tuple(widths) + (n_classes,))
    for s, (x, y) in enumerate(data):
        t.phase_prefix = "warm-up " if s < warmup else ""
        params, moments = backprop_step(t, x, y, params, moments, schedule)
    t.returns(params, moments)
    return t


# -----------------------------------------------------------------------------
# The FF softmax head: feature extraction and one SGD step (for the cost to a test error)


def trace_features(n_in, widths, chunk, top_k, rules=bytedmd.FUSED_FLOAT32_RULES,
                   schedule=NUMPY):
    """Module's extract_features on `chunk` digits: each layer L2-normalises its input,
    then forward; the top_k layers' activities L2-normalised into the features."""
    t = bytedmd.Trace(**rules)
    x = t.argument((chunk, n_in))
    params, _ = network_arguments(t, (n_in,) + tuple(widths))
    hs, h = [], x
    for W, b in params:
        h = layer_forward(t, l2_normalize(t, h, "features"), W, b, "features", schedule)
        hs.append(h)
    t.returns([l2_normalize(t, h, "features") for h in hs[-top_k:]])  # the head reads them
    return t


def trace_head_step(n_features, batch, n_classes=bp.N_CLASSES,
                    rules=bytedmd.FUSED_FLOAT32_RULES, schedule=NUMPY):
    """One step of the module's train_softmax: softmax_loss_and_grads with its weight
    decay (0.5 wd |W|^2 in the loss, dW += wd W), then W -= lr dW, b -= lr db."""
    t = bytedmd.Trace(**rules)
    F = t.argument((batch, n_features))
    y = t.argument((batch,), size=LABEL_BYTES)
    W, b = t.argument((n_features, n_classes)), t.argument((n_classes,))
    logits = t.op("head", schedule.matmul(t, "head", F, W), b[None, :])
    p = softmax_cross_entropy(t, logits, y, "head", "head", decay_of=W)
    dW = t.op("head", schedule.matmul(t, "head", F.T, p), t.op("head", W))
    db = t.sum_columns("head", p)
    t.returns(t.op("head", W, t.op("head", dW)), t.op("head", b, t.op("head", db)))
    return t


# -----------------------------------------------------------------------------
# Measurements


def measure(trace):
    """The cost of the trace's measured step (its phases not named "warm-up ..."), by phase,
    with the size of the whole trace and the seconds that pricing it took."""
    t0 = time.perf_counter()
    _, by_phase, _ = bytedmd.price(trace, per_read=False)
    measured = {ph: c for ph, c in by_phase.items() if not ph.startswith("warm-up ")}
    return {"cost": sum(measured.values()), "by_phase": measured,
            "trace_reads": trace.n_reads, "trace_ops": trace.n_ops,
            "seconds": time.perf_counter() - t0}


def fit_power_law(rows, factors, key):
    """Least-squares fit of log cost = log k + sum_f e_f log f over the rows; returns the
    exponents, k and the largest relative misfit."""
    X = np.array([[1.0] + [math.log(r[f]) for f in factors] for r in rows])
    y = np.array([math.log(r[key]) for r in rows])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    misfit = float(np.max(np.abs(np.exp(X @ coef - y) - 1)))
    return {"exponents": dict(zip(factors, map(float, coef[1:]))), "k": float(math.exp(coef[0])),
            "max_relative_misfit": misfit}


BASE = {"n_in": 196, "width": 64, "depth": 3, "batch": 4}
GRID = ([dict(BASE, width=w) for w in (16, 32, 64, 128)]
        + [dict(BASE, depth=d) for d in (2, 4)]
        + [dict(BASE, batch=b) for b in (1, 2, 8, 16)]
        + [dict(BASE, n_in=49)])
FACTORS = ("width", "depth", "batch", "n_in")


def measure_config(c, log=print):
    """FF, FF without its L2 normalisations, and backprop at one size (c: n_in, width,
    depth = hidden layers, batch)."""
    widths = (c["width"],) * c["depth"]
    row = dict(c)
    row["ff"] = measure(trace_ff_step(c["n_in"], widths, c["batch"]))
    row["ff_no_l2"] = measure(trace_ff_step(c["n_in"], widths, c["batch"], normalize=False))
    row["backprop"] = measure(trace_backprop_step(c["n_in"], widths, c["batch"]))
    ff_cost, bp_cost = row["ff"]["cost"], row["backprop"]["cost"]
    row["ratio"] = ff_cost / bp_cost
    row["ratio_without_update"] = ((ff_cost - row["ff"]["by_phase"]["update"])
                                   / (bp_cost - row["backprop"]["by_phase"]["update"]))
    row["shares"] = {"ff_l2_reads": row["ff"]["by_phase"]["l2norm"] / ff_cost,
                     "ff_l2_counterfactual": 1 - row["ff_no_l2"]["cost"] / ff_cost,
                     "ff_update": row["ff"]["by_phase"]["update"] / ff_cost,
                     "backprop_backward": row["backprop"]["by_phase"]["backward"] / bp_cost,
                     "backprop_update": row["backprop"]["by_phase"]["update"] / bp_cost}
    log(f"{c}: FF {ff_cost:.3e}  FF without L2 {row['ff_no_l2']['cost']:.3e}  backprop "
        f"{bp_cost:.3e}  FF/backprop {row['ratio']:.2f}  L2 share "
        f"{100 * row['shares']['ff_l2_reads']:.1f}%  backward share "
        f"{100 * row['shares']['backprop_backward']:.1f}%  "
        f"({row['ff']['seconds'] + row['ff_no_l2']['seconds'] + row['backprop']['seconds']:.0f} s)",
        flush=True)
    return row


def run_grid(args):
    t0 = time.perf_counter()
    rows = [measure_config(c) for c in GRID]
    fits = {}
    for name in ("ff", "ff_no_l2", "backprop"):
        fits[name] = fit_power_law([dict(r, cost=r[name]["cost"]) for r in rows], FACTORS, "cost")
    fits["ratio"] = fit_power_law(rows, FACTORS, "ratio")
    record = {"what": "ByteDMD cost of one training step (after one warm-up step), FF and "
                      "backprop on the same network, at small sizes; power-law fits over "
                      "all rows", "base": BASE, "rows": rows, "fits": fits,
              "seconds": time.perf_counter() - t0,
              "command": " ".join([COMMAND] + sys.argv[1:]),
              "environment": ff_runs.environment()}
    ff_runs.write_json(args.out, record)
    for name, fit in fits.items():
        print(f"{name}: exponents " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                 fit["exponents"].items())
              + f"; largest misfit {100 * fit['max_relative_misfit']:.0f}%")


# -----------------------------------------------------------------------------
# Steps at the size of the training comparison (784 inputs), and the cost to an error

STEP_BATCHES = {64: (1, 2, 4, 8, 16, 32), 128: (1, 2, 4, 8, 16)}  # widths of 784-w-w
HEAD_BATCH, FEATURE_CHUNKS, TRAIN_BATCH = 256, (4, 8, 16), 100


def polynomial_fit(xs, ys, degree):
    """Coefficients (constant first) of the least-squares polynomial in x."""
    return [float(v) for v in np.polyfit(np.asarray(xs, float), np.asarray(ys, float),
                                         degree)[::-1]]


def evaluate_polynomial(coef, x):
    return sum(c * x ** k for k, c in enumerate(coef))


def run_steps(args):
    """784-w-w at batches 1 to 16 or 32: FF with its negatives made, backprop; the FF
    head's SGD step at its batch of 256 and its feature extraction per digit. The cost of
    a step at the training batch of 100 from a + b B + c B^2 fitted on every traced batch,
    and, as a check, from a + b B fitted on batches 1-8 alone."""
    t0 = time.perf_counter()
    out = {"widths": {}, "train_batch": TRAIN_BATCH}
    for w, batches in STEP_BATCHES.items():
        widths, row = (w, w), {"batches": {}}
        for B in batches:
            row["batches"][B] = {
                "ff": measure(trace_ff_step(784, widths, B, negatives=True)),
                "backprop": measure(trace_backprop_step(784, widths, B))}
            print(f"784-{w}-{w}, batch {B}: FF {row['batches'][B]['ff']['cost']:.3e}  "
                  f"backprop {row['batches'][B]['backprop']['cost']:.3e}", flush=True)
        for name in ("ff", "backprop"):
            costs = [row["batches"][B][name]["cost"] for B in batches]
            quadratic = polynomial_fit(batches, costs, 2)
            small = [B for B in batches if B <= 8]
            affine = polynomial_fit(small, costs[:len(small)], 1)
            row[name + "_fit"] = {
                "quadratic": quadratic, "affine_on_1_to_8": affine,
                "quadratic_misfit": max(abs(evaluate_polynomial(quadratic, B) / c - 1)
                                        for B, c in zip(batches, costs)),
                "affine_error_at_largest": evaluate_polynomial(affine, batches[-1]) / costs[-1] - 1,
                "at_train_batch": evaluate_polynomial(quadratic, TRAIN_BATCH),
                "at_train_batch_affine": evaluate_polynomial(affine, TRAIN_BATCH)}
        row["head_step"] = measure(trace_head_step(2 * w, HEAD_BATCH))
        row["features"] = {c: measure(trace_features(784, widths, c, top_k=2))
                           for c in FEATURE_CHUNKS}
        row["features_fit"] = polynomial_fit(
            FEATURE_CHUNKS, [row["features"][c]["cost"] for c in FEATURE_CHUNKS], 1)
        print(f"784-{w}-{w} at batch {TRAIN_BATCH}: FF {row['ff_fit']['at_train_batch']:.3e} "
              f"(affine {row['ff_fit']['at_train_batch_affine']:.3e}), backprop "
              f"{row['backprop_fit']['at_train_batch']:.3e} (affine "
              f"{row['backprop_fit']['at_train_batch_affine']:.3e}); head step "
              f"{row['head_step']['cost']:.3e}, features {row['features_fit'][1]:.3e} a digit",
              flush=True)
        out["widths"][w] = row
    out.update(seconds=time.perf_counter() - t0,
               command=" ".join([COMMAND] + sys.argv[1:]),
               environment=ff_runs.environment())
    ff_runs.write_json(args.out, out)


def run_batch(args):
    """One step of FF (negatives made) and of backprop on 784-w-w traced directly at the
    training batch, after its warm-up step as everywhere: one JSON line per width, appended
    to --out once both are priced."""
    B = args.batch
    for w in args.widths:
        t0, widths = time.perf_counter(), (w, w)
        row = {"ff": measure(trace_ff_step(784, widths, B, negatives=True))}
        print(f"784-{w}-{w}, batch {B}: FF {row['ff']['cost']:.4e} ({row['ff']['trace_reads']} "
              f"reads, {row['ff']['seconds']:.0f} s)", flush=True)
        row["backprop"] = measure(trace_backprop_step(784, widths, B))
        ff_c, bp_c = row["ff"]["cost"], row["backprop"]["cost"]
        ph_ff, ph_bp = row["ff"]["by_phase"], row["backprop"]["by_phase"]
        record = {
            "script": "experiments/data_movement/data_movement.py",
            "what": "ByteDMD cost of one training step (after one warm-up step) traced at "
                    "the training batch, FF with its negatives made and backprop, 784-w-w, "
                    "rules bytedmd.FUSED_FLOAT32_RULES",
            "rules": bytedmd.FUSED_FLOAT32_RULES, "network": [784, w, w], "width": w,
            "batch": B, **row, "ratio": ff_c / bp_c,
            "ratio_without_update": (ff_c - ph_ff["update"]) / (bp_c - ph_bp["update"]),
            "shares": {"ff_negatives": ph_ff["negatives"] / ff_c,
                       "ff_l2": ph_ff["l2norm"] / ff_c, "ff_update": ph_ff["update"] / ff_c,
                       "backprop_backward": ph_bp["backward"] / bp_c,
                       "backprop_update": ph_bp["update"] / bp_c},
            "seconds": time.perf_counter() - t0, "peak_rss_mib": ff_runs.peak_rss_mib(),
            "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "environment": ff_runs.environment()}
        print(f"784-{w}-{w}, batch {B}: FF {ff_c:.4e}  backprop {bp_c:.4e} "
              f"({row['backprop']['trace_reads']} reads, {row['backprop']['seconds']:.0f} s)  "
              f"FF/backprop {record['ratio']:.3f}  peak {record['peak_rss_mib']:.0f} MiB",
              flush=True)
        text = json.dumps(ff_runs.finite_or_none(record))
        if bp.append_record(args.out, text):
            return 1
    return 0


RULES = {"original": bytedmd.ORIGINAL_RULES, "fused-float32": bytedmd.FUSED_FLOAT32_RULES}


def run_schedules(args):
    """One step of FF (its negatives made) and of backprop on 784-w-w under each schedule
    (schedules.py) and the chosen rules, at each batch (batch 1: per-example learning):
    one JSON line per width and batch, appended to --out once all its schedules are priced."""
    rules = RULES[args.rules]
    for w in args.widths:
        for B in args.batches:
            t0, rows = time.perf_counter(), {}
            for name in args.schedules:
                schedule = SCHEDULES[name]
                f = measure(trace_ff_step(784, (w, w), B, negatives=True, rules=rules,
                                          schedule=schedule))
                b = measure(trace_backprop_step(784, (w, w), B, rules=rules,
                                                schedule=schedule))
                rows[name] = {"ff": f, "backprop": b, "ratio": f["cost"] / b["cost"],
                              "shares": {
                                  "ff_l2": f["by_phase"]["l2norm"] / f["cost"],
                                  "ff_negatives": f["by_phase"]["negatives"] / f["cost"],
                                  "ff_update": f["by_phase"]["update"] / f["cost"],
                                  "backprop_backward": b["by_phase"]["backward"] / b["cost"],
                                  "backprop_update": b["by_phase"]["update"] / b["cost"]}}
                print(f"784-{w}-{w}, batch {B}, {name}: FF {f['cost']:.4e}  backprop "
                      f"{b['cost']:.4e}  FF/backprop {rows[name]['ratio']:.3f}  "
                      f"({f['seconds'] + b['seconds']:.0f} s)", flush=True)
            best = {alg: min(rows, key=lambda n: rows[n][alg]["cost"])
                    for alg in ("ff", "backprop")}
            record = {
                "script": "experiments/data_movement/data_movement.py",
                "what": "ByteDMD cost of one training step (after one warm-up step), FF with "
                        "its negatives made and backprop, 784-w-w, under each schedule "
                        "(experiments/data_movement/schedules.py)",
                "rules_name": args.rules, "rules": rules, "network": [784, w, w], "width": w,
                "batch": B, "schedules": rows,
                "best": {**best, "ratio": (rows[best["ff"]]["ff"]["cost"]
                                           / rows[best["backprop"]]["backprop"]["cost"])},
                "seconds": time.perf_counter() - t0, "peak_rss_mib": ff_runs.peak_rss_mib(),
                "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                "command": " ".join([COMMAND] + sys.argv[1:]),
                "environment": ff_runs.environment()}
            print(f"784-{w}-{w}, batch {B}: each at its best (FF {best['ff']}, backprop "
                  f"{best['backprop']}): FF/backprop {record['best']['ratio']:.3f}", flush=True)
            if bp.append_record(args.out, json.dumps(ff_runs.finite_or_none(record))):
                return 1
    return 0


SCHEDULE_COST = {"cost": float, "by_phase": {"l2norm?": float}}
SCHEDULE_RECORD = {"width": int, "batch": int, "rules_name": str, "best": {
    "ff": str, "backprop": str, "ratio": float}, "schedules": {"*": {
        "ff": SCHEDULE_COST, "backprop": SCHEDULE_COST, "ratio": float,
        "shares": {k: float for k in ("ff_l2", "ff_update", "backprop_backward",
                                       "backprop_update")}}}}


def read_json_lines(path, spec, kind):
    """The records of a JSON-lines file, each checked against spec; one line (RecordsError)
    naming the file and line of the first that is not one."""
    records = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RecordsError(f"{path}:{n}: not a JSON record (cut short?)") from None
        problem = mismatch(record, spec)
        if problem:
            raise RecordsError(f"{path}:{n}: not a record of {kind} ({problem})")
        records.append(record)
    return records


def run_schedules_table(args):
    """The schedules table of docs/data-movement.md, in markdown, from records of
    `schedules`: per width and batch, each schedule's cost of a step for FF and backprop,
    their ratio and the shares, then each algorithm at its best."""
    def e(v):
        return f"{v:.2e}".replace("e+0", "e").replace("e+", "e")

    def pct(v):
        return f"{100 * v:.1f}%"
    print("| network | batch | rules | schedule | FF | backprop | FF / backprop | L2 share of FF "
          "| Adam share: FF / backprop | backward share of backprop |")
    print("|" + "---|" * 10)
    for path in args.records:
        for r in read_json_lines(path, SCHEDULE_RECORD, "`data_movement.py schedules`"):
            net = f"784-{r['width']}-{r['width']}"
            for name, row in r["schedules"].items():
                sh = row["shares"]
                print(f"| {net} | {r['batch']} | {r['rules_name']} | {name} | "
                      f"{e(row['ff']['cost'])} | {e(row['backprop']['cost'])} | "
                      f"{row['ratio']:.2f} | {pct(sh['ff_l2'])} | {pct(sh['ff_update'])} / "
                      f"{pct(sh['backprop_update'])} | {pct(sh['backprop_backward'])} |")
            best = r["best"]
            print(f"| {net} | {r['batch']} | {r['rules_name']} | **each at its best** (FF "
                  f"{best['ff']}, backprop {best['backprop']}) | "
                  f"{e(r['schedules'][best['ff']]['ff']['cost'])} | "
                  f"{e(r['schedules'][best['backprop']]['backprop']['cost'])} | "
                  f"**{best['ratio']:.2f}** | | | |")


# The training curves: the real numpy code, FF (train_ff + a fresh softmax head at every
# evaluation) and backprop (backprop_baseline), on the first n_train training digits, both
# evaluated every `every` steps, at each learning rate given

CURVE_SETTINGS = {"n_train": 10000, "val_size": 10000, "batch_size": 100, "ff_epochs": 50,
                  "ff_threshold": 8.0, "ff_softmax_lr": 2.0, "ff_softmax_epochs": 30,
                  "bp_epochs": 10, "every": 10}


def quiet(*args, **kwargs):
    pass


def ff_curve(width, seed, lr, data, s):
    """(val, test) error of the FF network of two layers of `width` (Adam at lr) with a
    softmax head on both layers, fitted afresh (the module's SGD head) every s["every"]
    steps; step 0 is the untrained network."""
    x_fit, y_fit, x_val, y_val, x_test, y_test = data
    cfg = ff.FFConfig(layer_sizes=(784, width, width), n_epochs=s["ff_epochs"],
                      batch_size=s["batch_size"], lr=lr, threshold=s["ff_threshold"],
                      head="sgd", softmax_lr=s["ff_softmax_lr"],
                      softmax_epochs=s["ff_softmax_epochs"], top_k=2, n_train=s["n_train"],
                      val_size=s["val_size"], seed=seed)
    state = ff.FFState.fresh(cfg, np.random.default_rng(seed))
    points = []

    def evaluate(step):
        F_fit, F_val, F_test = (ff.extract_features(state.weights, state.biases, x, cfg.top_k)
                                for x in (x_fit, x_val, x_test))
        W, b, _ = ff.train_softmax(F_fit, y_fit, np.random.default_rng([seed, 1]),
                                   cfg.softmax_epochs, cfg.softmax_lr, cfg.softmax_weight_decay,
                                   log=quiet)
        points.append({"steps": step, "val_error": ff.error_rate(F_val, y_val, W, b),
                       "test_error": ff.error_rate(F_test, y_test, W, b)})

    batches, done = cfg.batches, [0]

    def evaluated_batches(*args):  # the loop asks for the next batch once a step is made
        for batch in batches(*args):
            yield batch
            done[0] += 1
            if done[0] % s["every"] == 0:
                evaluate(done[0])
    cfg.batches = evaluated_batches
    evaluate(0)
    ff.train_ff(x_fit, cfg, state, log=quiet)
    return points


def backprop_curve(width, seed, lr, data, s):
    """(val, test) error of backprop on the same network (Adam at lr) every s["every"]
    steps."""
    x_fit, y_fit, x_val, y_val, x_test, y_test = data
    cfg = bp.BPConfig(layer_sizes=(784, width, width), lr=lr, n_epochs=s["bp_epochs"],
                      batch_size=s["batch_size"], n_train=s["n_train"],
                      val_size=s["val_size"], seed=seed)
    points = []

    def evaluate(step, weights, biases):
        points.append({"steps": step, "val_error": bp.error_rate(weights, biases, x_val, y_val),
                       "test_error": bp.error_rate(weights, biases, x_test, y_test)})

    bp.train_backprop(cfg, x_fit, y_fit, x_val, y_val, log=quiet, every=s["every"],
                      callback=evaluate)
    return points


def run_curves(args):
    """Both algorithms at every width, learning rate and seed; the record is rewritten after
    each run (a run that diverges is kept, marked, with the points it made)."""
    s = dict(CURVE_SETTINGS)
    x_train, y_train, x_test, y_test = ff.load_mnist()
    x_fit, y_fit, x_val, y_val = ff.split_validation(x_train, y_train, s["val_size"],
                                                     s["n_train"])
    data = (x_fit, y_fit, x_val, y_val, x_test, y_test)
    jobs = [(width, name, curve, lr, seed) for width in args.widths
            for name, curve, lrs in (("ff", ff_curve, args.ff_lrs),
                                     ("backprop", backprop_curve, args.bp_lrs))
            for lr in lrs for seed in args.seeds]
    runs = []
    for n, (width, name, curve, lr, seed) in enumerate(jobs, 1):
        t0, diverged = time.perf_counter(), None
        try:
            points = curve(width, seed, lr, data, s)
        except ff_runs.TrainingDiverged as e:
            points, diverged = [], str(e)
        runs.append({"algorithm": name, "width": width, "lr": lr, "seed": seed,
                     "points": points, "seconds": time.perf_counter() - t0}
                    | ({"diverged": diverged} if diverged else {}))
        best = min(points, key=lambda p: p["val_error"]) if points else None
        print(f"[{n}/{len(jobs)}] {name} 784-{width}-{width} lr {lr:g} seed {seed}: "
              + (f"diverged ({diverged})" if diverged else
                 f"best val error {100 * best['val_error']:.2f}% at step {best['steps']}, "
                 f"last {100 * points[-1]['val_error']:.2f}%")
              + f"  ({runs[-1]['seconds']:.0f} s)", flush=True)
        ff_runs.write_json(args.out, {
            "what": "validation and test error against training steps, FF (a fresh softmax "
                    "head at each evaluation) and backprop, 784-w-w, first n_train training "
                    "digits, both evaluated every `every` steps, at each learning rate",
            "settings": s, "runs": runs, "complete": n == len(jobs),
            "command": " ".join([COMMAND] + sys.argv[1:]),
            "environment": ff_runs.environment()})


def steps_to(points, target):
    """The first step at which the validation error is at most target (None: never)."""
    return next((p["steps"] for p in points if p["val_error"] <= target), None)


def read_schedule_records(paths):
    """{(width, batch): record} of the records of `schedules` (a later one replaces)."""
    return {(r["width"], r["batch"]): r for path in paths
            for r in read_json_lines(path, SCHEDULE_RECORD, "`data_movement.py schedules`")}


def head_cost(width, s, rules, schedule):
    """FF's softmax head, priced once per run: the features of the n_train digits in chunks
    of the training batch (one chunk traced, times the number of chunks) and the head's
    SGD steps (one traced, times ff_softmax_epochs x the batches of HEAD_BATCH)."""
    chunk, n = s["batch_size"], s["n_train"]
    features = measure(trace_features(784, (width, width), chunk, 2, rules, schedule))["cost"]
    step = measure(trace_head_step(2 * width, HEAD_BATCH, rules=rules,
                                   schedule=schedule))["cost"]
    n_chunks, n_steps = -(-n // chunk), s["ff_softmax_epochs"] * -(-n // HEAD_BATCH)
    return {"schedule": schedule.name, "features_chunk": features, "chunks": n_chunks,
            "head_step": step, "head_steps": n_steps,
            "cost": n_chunks * features + n_steps * step}


def reached(runs, target):
    """Per learning rate, each seed's first step at or below target (None: never), and
    the test error there."""
    out = {}
    for r in sorted(runs, key=lambda r: (r["lr"], r["seed"])):
        k = steps_to(r["points"], target)
        test = next((p["test_error"] for p in r["points"] if p["steps"] == k), None)
        out.setdefault(r["lr"], []).append((k, test))
    return out


def tuned(runs, target):
    """The learning rate whose seeds all reach target in the fewest median steps (None
    when no rate's seeds all do): (lr, steps per seed, median steps, median test error),
    and every rate's steps."""
    per_lr = reached(runs, target)
    done = {lr: v for lr, v in per_lr.items() if all(k is not None for k, _ in v)}
    table = {f"{lr:g}": [k for k, _ in v] for lr, v in per_lr.items()}
    if not done:
        return None, table
    lr = min(done, key=lambda lr: (float(np.median([k for k, _ in done[lr]])), lr))
    steps = [k for k, _ in done[lr]]
    return {"lr": lr, "steps": steps, "median_steps": float(np.median(steps)),
            "median_test_error": float(np.median([e for _, e in done[lr]]))}, table


def run_to_error(args):
    """Cost to a validation error: for each width and target, each algorithm at its
    learning rate that gets there in the fewest median steps (over the seeds, on
    validation), times the cost of one step at the training batch traced under each
    algorithm's best schedule (records of `schedules`), FF adding its head once (traced
    here under FF's best schedule); also under numpy's order of operations."""
    curves = [read_json(path, RECORDS["curves"], "the record of `data_movement.py curves`")
              for path in args.curves]
    s = curves[0]["settings"]
    runs = [r for c in curves for r in c["runs"]]
    schedules = read_schedule_records(args.schedules)
    rows, heads = [], {}
    for width in sorted({r["width"] for r in runs}):
        rec = schedules[width, s["batch_size"]]
        rules = RULES[rec["rules_name"]]
        best = rec["best"]
        orders = {"best": (best["ff"], best["backprop"]), "numpy": ("numpy", "numpy")}
        heads[width] = {k: head_cost(width, s, rules, SCHEDULES[ff_name])
                        for k, (ff_name, _) in orders.items()}
        by_alg = {alg: [r for r in runs if r["algorithm"] == alg and r["width"] == width]
                  for alg in ("ff", "backprop")}
        for target in args.targets:
            row = {"width": width, "target_val_error": target}
            for alg in by_alg:
                row[alg], row[alg + "_steps_by_lr"] = tuned(by_alg[alg], target)
            if row["ff"] and row["backprop"]:
                row["steps_ratio"] = row["ff"]["median_steps"] / row["backprop"]["median_steps"]
                for k, (ff_name, bp_name) in orders.items():
                    ff_step = rec["schedules"][ff_name]["ff"]["cost"]
                    bp_step = rec["schedules"][bp_name]["backprop"]["cost"]
                    ff_cost = row["ff"]["median_steps"] * ff_step + heads[width][k]["cost"]
                    bp_cost = row["backprop"]["median_steps"] * bp_step
                    row[k] = {"ff_schedule": ff_name, "backprop_schedule": bp_name,
                              "ff_step": ff_step, "backprop_step": bp_step,
                              "ff_cost": ff_cost, "backprop_cost": bp_cost,
                              "ff_head_share": heads[width][k]["cost"] / ff_cost,
                              "ratio": ff_cost / bp_cost}
            rows.append(row)
            print(f"784-{width}-{width}, val error <= {100 * target:.1f}%: "
                  + (f"FF lr {row['ff']['lr']:g} steps {row['ff']['steps']}, backprop lr "
                     f"{row['backprop']['lr']:g} steps {row['backprop']['steps']}; FF/backprop "
                     f"{row['best']['ratio']:.1f} at the best schedules, "
                     f"{row['numpy']['ratio']:.1f} in numpy's order"
                     if "best" in row else "not reached by every seed of any rate: FF "
                     f"{row['ff_steps_by_lr']}, backprop {row['backprop_steps_by_lr']}"),
                  flush=True)
    record = {
        "script": "experiments/data_movement/data_movement.py",
        "what": "ByteDMD cost to reach a validation error: the median steps over the seeds "
                "at each algorithm's fastest learning rate, times the cost of a step at the "
                "training batch (traced, records of `schedules`) under each algorithm's best "
                "schedule and under numpy's order; FF adds its head once",
        "settings": s, "rules_name": rec["rules_name"], "heads": heads, "rows": rows,
        "inputs": args.curves + args.schedules,
        "command": " ".join([COMMAND] + sys.argv[1:]), "environment": ff_runs.environment()}
    ff_runs.write_json(args.out, ff_runs.finite_or_none(record))
    if args.figure:
        plot_to_error(record, args.figure)
    return 0


def plot_to_error(record, path):
    """Cost to each validation error against the error, FF and backprop at each width,
    each at its best schedule (solid) and in numpy's order (dotted), log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (width, color) in zip(sorted({r["width"] for r in record["rows"]}), ("C0", "C1", "C2")):
        rows = [r for r in record["rows"] if r["width"] == width and "best" in r]
        x = [100 * r["target_val_error"] for r in rows]
        for alg, marker in (("ff", "o"), ("backprop", "s")):
            label = "FF" if alg == "ff" else "backprop"
            ax.plot(x, [r["best"][alg + "_cost"] for r in rows], marker + "-", color=color,
                    label=f"{label}, 784-{width}-{width}", mfc="white" if alg == "ff" else color)
            ax.plot(x, [r["numpy"][alg + "_cost"] for r in rows], ":", color=color)
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("validation error to reach (%)")
    ax.set_ylabel("ByteDMD cost to reach it")
    ax.set_title("data movement to a validation error (solid: each at its best schedule; "
                 "dotted: numpy's order)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run_to_error_table(args):
    """The cost-to-error table of docs/data-movement.md, in markdown, from `to-error`."""
    record = read_json(args.record, RECORDS["to-error"], "the record of `to-error`")

    def e(v):
        return f"{v:.2e}".replace("e+0", "e").replace("e+", "e")
    print("| network | validation error to reach | FF: lr, steps (seeds) | backprop: lr, steps "
          "(seeds) | steps FF / backprop | FF cost, best schedule (head's share) | backprop "
          "cost, best schedule | FF / backprop, best | FF / backprop, numpy's order | test "
          "error there: FF / backprop |")
    print("|" + "---|" * 10)
    for r in record["rows"]:
        net, tgt = f"784-{r['width']}-{r['width']}", f"{100 * r['target_val_error']:.1f}%"
        if "best" not in r:
            print(f"| {net} | {tgt} | not reached by every seed at any rate | | | | | | | |")
            continue
        f, b, best = r["ff"], r["backprop"], r["best"]
        print(f"| {net} | {tgt} | {f['lr']:g}: {', '.join(map(str, f['steps']))} | "
              f"{b['lr']:g}: {', '.join(map(str, b['steps']))} | {r['steps_ratio']:.1f} | "
              f"{e(best['ff_cost'])} ({100 * best['ff_head_share']:.1f}%) | "
              f"{e(best['backprop_cost'])} | **{best['ratio']:.1f}** | "
              f"{r['numpy']['ratio']:.1f} | {100 * f['median_test_error']:.1f}% / "
              f"{100 * b['median_test_error']:.1f}% |")


def run_plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(args.grid) as f:
        grid = json.load(f)
    base = grid["base"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, factor in zip(axes, ("width", "batch")):
        rows = sorted((r for r in grid["rows"]
                       if all(r[k] == v for k, v in base.items() if k != factor)),
                      key=lambda r: r[factor])
        x = [r[factor] for r in rows]
        for name, label, style in (("ff", "FF", "o-"), ("ff_no_l2", "FF without L2 norm", "o--"),
                                   ("backprop", "backprop", "s-")):
            ax.plot(x, [r[name]["cost"] for r in rows], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(x)
        ax.set_xticklabels([str(v) for v in x])
        ax.set_xlabel(f"{factor} ({'units per hidden layer' if factor == 'width' else 'digits per step'})")
        others = ", ".join(f"{k} {v}" for k, v in base.items() if k != factor)
        ax.set_title(f"one training step ({others})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ByteDMD cost of one step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def run_tables(args):
    """The tables of docs/data-movement.md, in markdown, from the records."""
    def e(v):
        return f"{v:.2e}".replace("e+0", "e").replace("e+", "e")

    def pct(v):
        return f"{100 * v:.1f}%"

    with open(args.grid) as f:
        grid = json.load(f)
    print("| inputs | width | hidden layers | batch | FF | FF without L2 | backprop | FF / "
          "backprop | same, Adam left out | L2 share of FF: its reads / cost saved without "
          "it | backward share of backprop | Adam share: FF / backprop |")
    print("|" + "---|" * 12)
    for r in grid["rows"]:
        sh = r["shares"]
        print(f"| {r['n_in']} | {r['width']} | {r['depth']} | {r['batch']} | {e(r['ff']['cost'])} "
              f"| {e(r['ff_no_l2']['cost'])} | {e(r['backprop']['cost'])} | {r['ratio']:.2f} | "
              f"{r['ratio_without_update']:.2f} | {pct(sh['ff_l2_reads'])} / "
              f"{pct(sh['ff_l2_counterfactual'])} | {pct(sh['backprop_backward'])} | "
              f"{pct(sh['ff_update'])} / {pct(sh['backprop_update'])} |")
    print()
    print("| cost of a step | width | hidden layers | batch | inputs | largest misfit |")
    print("|---|---|---|---|---|---|")
    for name, label in (("ff", "FF"), ("ff_no_l2", "FF without L2"), ("backprop", "backprop"),
                        ("ratio", "FF / backprop")):
        fit = grid["fits"][name]
        print(f"| {label} | " + " | ".join(f"{fit['exponents'][k]:.2f}" for k in FACTORS)
              + f" | {pct(fit['max_relative_misfit'])} |")
    traced = batch_costs(read_batch_records(args.traced)) if args.traced else None
    if args.steps:
        with open(args.steps) as f:
            steps = json.load(f)
        print()
        print("| network | batch | FF (negatives made) | of which the negatives | backprop | "
              "FF / backprop |")
        print("|---|---|---|---|---|---|")
        for w, st in steps["widths"].items():
            for B, m in st["batches"].items():
                ff_c, bp_c = m["ff"]["cost"], m["backprop"]["cost"]
                print(f"| 784-{w}-{w} | {B} | {e(ff_c)} | "
                      f"{pct(m['ff']['by_phase']['negatives'] / ff_c)} | {e(bp_c)} | "
                      f"{ff_c / bp_c:.2f} |")
            if traced:
                for (tw, tb), m in sorted(traced.items()):
                    if str(tw) == w:
                        print(f"| 784-{w}-{w} | {tb}, traced | {e(m['ff'])} | "
                              f"{pct(m['ff_negatives'])} | {e(m['backprop'])} | "
                              f"{m['ff'] / m['backprop']:.2f} |")
                continue
            q = {n: st[n + "_fit"]["at_train_batch"] for n in ("ff", "backprop")}
            lin = {n: st[n + "_fit"]["at_train_batch_affine"] for n in ("ff", "backprop")}
            print(f"| 784-{w}-{w} | {steps['train_batch']}, quadratic fit | {e(q['ff'])} | - | "
                  f"{e(q['backprop'])} | {q['ff'] / q['backprop']:.2f} |")
            print(f"| 784-{w}-{w} | {steps['train_batch']}, line through 1-8 | {e(lin['ff'])} | - "
                  f"| {e(lin['backprop'])} | {lin['ff'] / lin['backprop']:.2f} |")


# -----------------------------------------------------------------------------
# The command line: every flag, output path and input record checked before anything is
# traced or trained (a grid or curves run takes minutes to hours)

FIT = {"at_train_batch": float, "at_train_batch_affine": float}
RECORDS = {  # the fields of each subcommand's record that the others read
    "grid": {"base": {k: int for k in FACTORS},
             "rows": [{**{k: int for k in FACTORS}, "ratio": float, "ratio_without_update": float,
                       **{name: {"cost": float} for name in ("ff", "ff_no_l2", "backprop")},
                       "shares": {k: float for k in ("ff_l2_reads", "ff_l2_counterfactual",
                                                     "ff_update", "backprop_backward",
                                                     "backprop_update")}}],
             "fits": {name: {"exponents": {k: float for k in FACTORS},
                             "max_relative_misfit": float}
                      for name in ("ff", "ff_no_l2", "backprop", "ratio")}},
    "steps": {"train_batch": int, "widths": {"*": {
        "batches": {"*": {"ff": {"cost": float, "by_phase": {"negatives": float}},
                          "backprop": {"cost": float}}},
        "ff_fit": FIT, "backprop_fit": FIT, "features_fit": [float],
        "head_step": {"cost": float}}}},
    "curves": {"settings": {"batch_size": int, "n_train": int, "ff_softmax_epochs": int},
               "runs": [{"algorithm": str, "width": int, "seed": int, "points": [
                   {"steps": int, "val_error": float, "test_error": float}]}]},
    "to-error": {"settings": {"batch_size": int}, "rows": [{
        "width": int, "target_val_error": float,
        "ff": ({"lr": float, "steps": [int], "median_test_error": float}, None),
        "backprop": ({"lr": float, "steps": [int], "median_test_error": float}, None),
        "steps_ratio?": float,
        **{k + "?": {"ratio": float, "ff_cost": float, "backprop_cost": float,
                     "ff_head_share": float} for k in ("best", "numpy")}}]},
}


def fraction(text):
    """A validation error to reach: a fraction in (0, 1], not a percentage."""
    value = ff_runs.number_arg(float, 0, above=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is above 1: give validation errors as "
                                         "fractions (0.06 for 6%)")
    return value


def build_parser():
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="one step of each at small sizes, priced; power-law fits")
    g.add_argument("--out", required=True, help="JSON record to write")
    s = sub.add_parser("steps", help="steps at 784-64-64 and 784-128-128, batches 1-16")
    s.add_argument("--out", required=True, help="JSON record to write")
    b = sub.add_parser("batch", help="one step of each at 784-w-w traced at the training "
                       "batch, appended as JSON lines")
    b.add_argument("--widths", type=ff_runs.number_arg(int, 1), nargs="+", default=[64, 128])
    b.add_argument("--batch", type=ff_runs.number_arg(int, 1), default=TRAIN_BATCH)
    b.add_argument("--out", required=True, help="JSON-lines file to append to")
    sc = sub.add_parser("schedules", help="one step of each at 784-w-w under each schedule, "
                        "appended as JSON lines")
    sc.add_argument("--widths", type=ff_runs.number_arg(int, 1), nargs="+", default=[64])
    sc.add_argument("--batches", type=ff_runs.number_arg(int, 1), nargs="+",
                    default=[TRAIN_BATCH, 1])
    sc.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    sc.add_argument("--rules", choices=RULES, default="original",
                    help="the tracer's rules: the original ByteDMD's (default) or this "
                         "suite's earlier fused float32 ones")
    sc.add_argument("--out", required=True, help="JSON-lines file to append to")
    c = sub.add_parser("curves", help="train FF and backprop on 784-w-w, errors per step")
    c.add_argument("--widths", type=ff_runs.number_arg(int, 1), nargs="+", default=[64])
    c.add_argument("--seeds", type=ff_runs.number_arg(int, 0), nargs="+", default=[0, 1, 2])
    c.add_argument("--ff-lrs", type=ff_runs.number_arg(float, 0, above=True), nargs="*",
                   default=[0.03], help="FF's Adam learning rates (none: no FF runs)")
    c.add_argument("--bp-lrs", type=ff_runs.number_arg(float, 0, above=True), nargs="*",
                   default=[1e-3], help="backprop's Adam learning rates (none: no backprop runs)")
    c.add_argument("--out", required=True, help="JSON record to write")
    te = sub.add_parser("to-error", help="cost to a validation error at tuned rates, each "
                        "algorithm at its best schedule")
    te.add_argument("--curves", required=True, nargs="+", help="records of `curves`")
    te.add_argument("--schedules", required=True, nargs="+",
                    help="records of `schedules` holding each width at the curves' batch")
    te.add_argument("--targets", type=fraction, nargs="+", required=True,
                    help="validation errors to reach (fractions, e.g. 0.06)")
    te.add_argument("--out", required=True, help="JSON record to write")
    te.add_argument("--figure", help="also draw the costs (PNG)")
    tt = sub.add_parser("to-error-table", help="the cost-to-error table of the doc")
    tt.add_argument("--record", required=True, help="the record of `to-error`")
    g2 = sub.add_parser("plot", help="cost per step against width and batch, log-log")
    g2.add_argument("--grid", required=True, help="the record of `grid`")
    g2.add_argument("--out", required=True, help="the figure (PNG)")
    st = sub.add_parser("schedules-table", help="the schedules table of docs/data-movement.md")
    st.add_argument("--records", nargs="+", required=True, help="records of `schedules`")
    tb = sub.add_parser("tables", help="the markdown tables of docs/data-movement.md")
    tb.add_argument("--grid", required=True)
    tb.add_argument("--steps")
    tb.add_argument("--traced", help="the records of `batch`: the steps table shows the traced "
                    "training batch instead of the fits")
    return p


def check_flags(p, args):
    """Exit 2 (one line) on a flag that cannot work: a value given twice (a seed or width
    counted twice in the means), an output path that cannot be written."""
    for name in ("widths", "seeds", "targets", "batches", "schedules", "ff_lrs", "bp_lrs"):
        values = getattr(args, name, [])
        if len(set(values)) < len(values):
            p.error(f"--{name.replace('_', '-')} {' '.join(map(str, values))} repeats a value")
    if hasattr(args, "out"):
        try:
            (check_figure if args.command == "plot" else check_out)(args.out)
        except RecordsError as e:
            p.error(str(e))


def read_inputs(args):
    """{kind: [record]} of the record files the command reads (--grid, --steps, --curves,
    --cost: each the record of that subcommand), refused in one line (exit 1) when one cannot
    be read or is another kind of record."""
    inputs = {}
    for kind, spec in RECORDS.items():
        paths = getattr(args, kind, None) or []
        inputs[kind] = [read_json(path, spec, f"the record of `data_movement.py {kind}`")
                        for path in ([paths] if isinstance(paths, str) else paths)]
    return inputs


BATCH_RECORD = {"width": int, "batch": int, "ff": {"cost": float, "by_phase": {"negatives": float}},
                "backprop": {"cost": float}}


def read_batch_records(path):
    """The records of `batch` (one JSON object a line), refused in one line if a line is not
    one."""
    return read_json_lines(path, BATCH_RECORD, "`data_movement.py batch`")


def batch_costs(records):
    """{(width, batch): {"ff": cost, "backprop": cost, "ff_negatives": share}} from the
    records of `batch` (a later record of the same size replaces an earlier one)."""
    return {(r["width"], r["batch"]): {
        "ff": r["ff"]["cost"], "backprop": r["backprop"]["cost"],
        "ff_negatives": r["ff"]["by_phase"]["negatives"] / r["ff"]["cost"]} for r in records}


def check_to_error_inputs(args):
    """The curves must be one experiment (the same settings, every rate of an algorithm
    run at the same seeds, no run twice) and --schedules must hold each of its widths at
    its batch."""
    curves = [read_json(path, RECORDS["curves"], "the record of `data_movement.py curves`")
              for path in args.curves]
    settings, seen = curves[0]["settings"], {}
    if "every" not in settings:
        raise RecordsError(f"--curves {args.curves[0]} evaluates FF once an epoch (an earlier "
                           "record); `to-error` needs both evaluated every `every` steps")
    for path, record in zip(args.curves, curves):
        if record["settings"] != settings:
            raise RecordsError(f"--curves {path} and {args.curves[0]} were trained with "
                               "different settings; give the records of one experiment")
        for run in record["runs"]:
            key = (run["algorithm"], run["width"], run.get("lr"), run["seed"])
            if key in seen:
                raise RecordsError(f"--curves {seen[key]} and {path} both hold the {key[0]} "
                                   f"run of 784-{key[1]}-{key[1]}, lr {key[2]}, seed {key[3]}")
            seen[key] = path
    seeds = {}
    for alg, width, lr, seed in seen:
        seeds.setdefault((alg, width, lr), set()).add(seed)
    if len({frozenset(v) for v in seeds.values()}) > 1:
        raise RecordsError("--curves: not every algorithm, width and rate was run at the same "
                           "seeds: " + "; ".join(f"{a} 784-{w}-{w} lr {lr:g}: {sorted(v)}"
                                                 for (a, w, lr), v in sorted(seeds.items())))
    have = read_schedule_records(args.schedules)
    rules = set()
    for width in sorted({w for _, w, _ in seeds}):
        if (width, settings["batch_size"]) not in have:
            raise RecordsError(f"--schedules {' '.join(args.schedules)} has no step of "
                               f"784-{width}-{width} at batch {settings['batch_size']}")
        rules.add(have[width, settings["batch_size"]]["rules_name"])
    if len(rules) > 1:
        raise RecordsError(f"--schedules priced the widths under different rules ("
                           f"{', '.join(sorted(rules))}); give steps priced under one")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_flags(p, args)

    def body():
        read_inputs(args)  # each record it reads, checked before anything is computed
        if getattr(args, "traced", None):
            batch_costs(read_batch_records(args.traced))
        if args.command == "to-error":
            check_to_error_inputs(args)
        try:
            return {"tables": run_tables, "grid": run_grid, "steps": run_steps,
                    "batch": run_batch, "schedules": run_schedules,
                    "schedules-table": run_schedules_table, "curves": run_curves,
                    "to-error": run_to_error, "to-error-table": run_to_error_table,
                    "plot": run_plot}[args.command](args)
        except ff.DataError as e:  # curves: MNIST missing or damaged
            raise RecordsError(str(e)) from None
    return main_of(body)


if __name__ == "__main__":
    sys.exit(main())
