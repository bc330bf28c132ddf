"""Break the module on purpose, on a scratch copy, and check that the tests notice.

Each mutant is one textual change to the code (ff_hybrid_mnist.py, ff_label_mnist.py,
ff_local_mnist.py, ff_recurrent_mnist.py, ff_runs.py, ff_devices.py and
experiments/data_movement/data_movement.py: each text is found once among them) that a
broken implementation could plausibly contain. For each, the repository is copied to a temporary folder, the change is
applied, and the given tests are run there; a mutant that passes every test is reported
as SURVIVED (the tests cannot see that bug). Not collected by pytest (no test_ prefix).

    python3 -m bench.run_mutants                     # all mutants: training, label, local, recipe, CLI tests
    python3 -m bench.run_mutants --tests tests       # against the whole suite
    python3 -m bench.run_mutants --tests "tests/test_training.py -k tiny"  # one test
    python3 -m bench.run_mutants --only recurrent --tests tests/test_recurrent.py
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = ("ff_hybrid_mnist.py", "ff_label_mnist.py", "ff_local_mnist.py", "ff_recurrent_mnist.py",
        "ff_runs.py",
        "ff_devices.py", "experiments/data_movement/data_movement.py")

MUTANTS = {  # name -> (text in one of CODE, its replacement, and so on)
    "data movement: FF evaluated before its step": (
        "            yield batch\n            done[0] += 1\n",
        "            done[0] += 1\n",
        "                evaluate(done[0])\n    cfg.batches",
        "                evaluate(done[0])\n            yield batch\n    cfg.batches"),
    "data movement: a rate not every seed finishes can win": (
        "if all(k is not None for k, _ in v)}", "if any(k is not None for k, _ in v)}"),
    "data movement: FF's head left out of its cost": (
        'ff_cost = row["ff"]["median_steps"] * ff_step + heads[width][k]["cost"]',
        'ff_cost = row["ff"]["median_steps"] * ff_step'),
    "no FF weight update": (
        "    state.opt_w[l].step(W, dW, lr)\n    state.opt_b[l].step(b, db, lr)\n",
        "    pass\n"),
    "positives and negatives swapped": (
        "        x[:B] = x_train[pos[batch]]\n", "        x[B:] = x_train[pos[batch]]\n",
        "cfg.n_blur, out=x[B:],", "cfg.n_blur, out=x[:B],"),
    "hybrids built from b = a": (
        "make_hybrid_batch(x_train[pa[batch]], x_train[pb[batch]]",
        "make_hybrid_batch(x_train[pa[batch]], x_train[pa[batch]]"),
    "no L2 normalisation between layers": (
        "            normalize(h, out=inputs[l + 1])\n",
        "            np.copyto(inputs[l + 1], h)\n"),
    "no L2 normalisation before layer 1": (
        "    normalize(x, out=inputs[0])\n",
        "    np.copyto(inputs[0], x)\n"),
    "sum-goodness threshold not scaled by n_units": (
        'return self.threshold * (n_units if self.goodness == "sum" else 1)',
        "return self.threshold"),
    "--lr-decay ignored": (
        '    if cfg.lr_decay == "linear-half":\n', "    if False:\n"),
    "label negatives: right and wrong labels swapped": (
        "embed_labels(digits, y, out=x[:B])", "embed_labels(digits, y, out=x[B:])",
        "embed_labels(digits, wrong, out=x[B:])", "embed_labels(digits, wrong, out=x[:B])"),
    "locally-connected: grid locations transposed": (
        "columns[i * stride:i * stride + rf, j * stride:j * stride + rf]",
        "columns[j * stride:j * stride + rf, i * stride:i * stride + rf]"),
    "locally-connected: weight gradient mixes locations": (
        "dz.reshape(len(dz), n_loc, channels).transpose(1, 0, 2), out=dW)",
        "dz.reshape(n_loc, len(dz), channels), out=dW)"),
    "locally-connected: init not scaled to the fan-in": (
        "return local_blocks(W, self.index) * np.sqrt(np.float32(len(W))\n"
        "                                                     / np.float32(self.index.shape[1]))",
        "return local_blocks(W, self.index)"),
    "locally-connected: masked-form files read as blocks": (
        "return local_blocks(a, index) if index is not None and a.ndim == 2 else a",
        "return a"),
    "label negatives: label pixels not written": (
        "    if labels is not None:\n        out[xp.arange(len(out)), xp.asarray(labels)] = LABEL_ON\n",
        ""),
    "hard negatives: drawn uniformly": (
        "        wrong_all = sample_wrong_labels(to_host(scores), y_train, rng.random(n))[pos]\n",
        "        wrong_all = (y_train[pos] + rng.integers(1, N_CLASSES, n)) % N_CLASSES\n"),
    "hard-negative head: never learns": (
        "        W -= cfg.hard_head_lr * dW\n        b -= cfg.hard_head_lr * db\n", "        pass\n"),
    "author's peer term gated by the ReLU": (
        "    dz[:n_pos] += (coef / n_pos * (r - r.mean())).astype(h.dtype, copy=False)\n",
        "    dz[:n_pos] += (h[:n_pos] > 0) * (coef / n_pos * (r - r.mean())).astype(h.dtype, "
        "copy=False)\n"),
    "RMS normalisation replaced by L2": (
        'NORMALIZE = {"l2": l2_normalize, "rms": rms_normalize}',
        'NORMALIZE = {"l2": l2_normalize, "rms": l2_normalize}'),
    "smoothed SGD: no smoothing": (
        "        grad *= 1.0 - self.delay\n        self.g *= self.delay\n",
        "        self.g *= 0.0\n"),
    "smoothed SGD: weight cost ignored": (
        "            param *= 1.0 - float(lr) * self.weight_decay\n", "            pass\n"),
    "hard-negative head: smoothed step skipped": (
        "            opt.step(p, grad, cfg.hard_head_lr * gain)\n", "            pass\n"),
    "author's lr decay ignored": (
        '    if cfg.lr_decay == "linear-half-epochs":\n', "    if False:\n"),
    "author's peer means start at 0": (
        'peer_start = 0.5 if cfg.peer_kind == "author" else 0.0', "peer_start = 0.0"),
    "hard-negative head: labels drawn uniformly": (
        "    wrong = sample_wrong_labels(logits, y, u)\n",
        "    wrong = (y + (u * 9).astype(int) + 1) % N_CLASSES\n"),
    "hard-negative head: sees the true label": (
        "    embed_labels(digits, None, out=buf)\n", "    embed_labels(digits, y, out=buf)\n"),
    "hard-negative head: not checkpointed": (
        "        arrays.update(head_W=to_host(state.head[0]), head_b=to_host(state.head[1]))\n",
        "        pass\n"),
    "hard negatives: the true label can be drawn": (
        "    s[xp.arange(len(s)), y] = -np.inf\n", ""),
    "hard negatives: the least preferred label drawn": (
        "    p = xp.exp(s - s.max(axis=1, keepdims=True))\n",
        "    p = xp.where(xp.isfinite(s), xp.exp(s.min(axis=1, keepdims=True) - s), 0)\n"),
    # what a GPU step does: each of these leaves the CPU's numbers as they are, so only the
    # launch budgets in tests/test_gpu.py can see them
    "GPU: the step's loss read back every step": (
        "                losses[i, l], goodnesses[i, l] = loss, g\n",
        "                losses[i, l], goodnesses[i, l] = float(loss), g\n"),
    "GPU: hybrids gathered with host permutations": (
        "    pos, pa, pb = xp.asarray(np.stack([pos, pa, pb]))\n", ""),
    "GPU: the softmax head's loss read back every step": (
        "            loss_sum += loss.astype(np.float64) * len(idx)",
        "            loss_sum += float(loss) * len(idx)"),
    "GPU: einsum for the goodness": (
        "    g = row_squares(h)\n", '    g = xp_of(h).einsum("ij,ij->i", h, h)\n'),
    "converged head: the C with the most validation error kept": (
        '        if best is None or hist["choice_error"] < best[0]:\n',
        '        if best is None or hist["choice_error"] > best[0]:\n'),
    "converged head: C chosen on the test split": (
        '        W, b, history = fit_head_converged(F_fit, y_fit, F.get("val"), y.get("val"),\n',
        '        W, b, history = fit_head_converged(F_fit, y_fit, F.get("test"), y.get("test"),\n'),
    "converged head: no float64 finish where float32 rounding stops the fit": (
        "    if np.abs(result.jac).max() > gtol and F.dtype != np.float64 and iterations < max_iter:\n",
        "    if False:\n"),
    "converged head: the fit stopped early": (
        '"gtol": gtol, "ftol": 0.0', '"gtol": 100 * gtol, "ftol": 0.0'),
    "converged head: the penalty left out of its gradient": (
        "    dW += weight_decay * W\n", "    pass\n"),
    "--checkpoint-every ignored": (
        "        if (epoch + 1) % every == 0 or epoch + 1 == total_epochs(cfg):\n",
        "        if True:\n"),
    # the recurrent network (ff_recurrent_mnist.py)
    "recurrent: no factor 1 - damping in dL/dz": (
        "    dh *= 1.0 - damping\n    return dh\n", "    return dh\n"),
    "recurrent: no ReLU mask in dL/dz": ("    xp.multiply(dh, mask, out=dh)\n", ""),
    "recurrent: no damping": (
        "    new *= 1.0 - damping\n    h *= damping\n    h += new\n", "    h[...] = new\n"),
    "recurrent: no top-down input from the layer above": (
        "            targets.append(work.inputs[l - 1][slot][:, top_down_at[l - 1]:])\n",
        "            work.inputs[l - 1][slot][:, top_down_at[l - 1]:] = 0\n"),
    "recurrent: no label at the top": (
        "            xp.matmul(work.label, W[n_below:], out=static)\n",
        "            static[...] = 0\n"),
    "recurrent: layers updated in turn, not synchronously": (
        "            yield t, l\n", "            yield t, l\n            publish(l, read)\n"),
    "recurrent: the bottom-up pass sees the label": (
        "            layer_forward(below, W[:n_below], b, out=work.h[l])\n",
        "            layer_forward(below, W[:n_below], b, out=work.h[l])\n"
        "            if l == n_layers - 1:\n"
        "                work.h[l] += xp.maximum(work.label @ W[n_below:], 0)\n"),
    "recurrent: neighbours' states not normalised": (
        "            normalize(work.h[l], out=targets[0])\n",
        "            xp.copyto(targets[0], work.h[l])\n"),
    "recurrent: gradient from another iteration's inputs": (
        "layer_grads(inputs.reshape(-1, inputs.shape[2]), dz.reshape(-1, n_out),",
        "layer_grads(xp.roll(inputs, 1, axis=0).reshape(-1, inputs.shape[2]), "
        "dz.reshape(-1, n_out),"),
    "recurrent: no gradient for the image's weights": (
        "        xp.matmul(work.image.T, dz_sum, out=dW[:n_below])\n",
        "        dW[:n_below] = 0\n"),
    "recurrent: no weight update": (
        "        state.opt_w[l].step(W, dW, lr)\n        state.opt_b[l].step(b, db, lr)\n",
        "        pass\n"),
    "recurrent: right and wrong labels swapped": (
        "        one_hot(labels[batch], out=x[:B, n_pixels:])\n",
        "        one_hot(labels[batch], out=x[B:, n_pixels:])\n",
        "        one_hot(wrong, out=x[B:, n_pixels:])\n",
        "        one_hot(wrong, out=x[:B, n_pixels:])\n"),
    "recurrent: hard negatives drawn against the network's preference": (
        "wrong = sample_wrong_labels(scores, labels[batch]",
        "wrong = sample_wrong_labels(-scores, labels[batch]"),
    "recurrent: the first iteration's scores without the damped bottom-up state": (
        "    h += cfg.damping * xp.maximum(z, 0)[:, None, :]",
        "    h += 0 * xp.maximum(z, 0)[:, None, :]"),
    "recurrent: wrong labels not from the run's generator": (
        "    steps = np.concatenate([rng.integers(1, N_CLASSES, B) for _ in range(n_batches)])\n"
        "    wrong_all",
        "    steps = np.random.default_rng().integers(1, N_CLASSES, n_batches * B)\n"
        "    wrong_all"),
    "recurrent: read-out from iteration 1": (
        "            if t >= cfg.readout_first:\n", "            if True:\n"),
    "recurrent: a softmax head accepted": (
        '("softmax_epochs", self.softmax_epochs > 0,', '("softmax_epochs", False,'),
    "recurrent: --top-k accepted and ignored": (
        'for name in ("softmax_epochs", "top_k", "head",',
        'for name in ("softmax_epochs", "head",'),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", default="tests/test_training.py tests/test_labels.py "
                                      "tests/test_softmax.py tests/test_refit_head.py "
                                      "tests/test_local.py tests/test_recipe.py "
                                      "tests/test_cli.py tests/test_gpu.py tests/test_recurrent.py "
                                      "tests/test_to_error.py")
    p.add_argument("--only", help="run the mutants whose name contains this text")
    p.add_argument("--check", action="store_true",
                   help="only check that every mutant's text is found once, and exit")
    args = p.parse_args(argv)
    sources = {}
    for path in CODE:
        with open(os.path.join(ROOT, path)) as f:
            sources[path] = f.read()
    survived = []
    for name, edits in MUTANTS.items():
        if args.only and args.only not in name:
            continue
        mutated = dict(sources)
        for old, new in zip(edits[::2], edits[1::2]):
            where = [path for path, text in mutated.items() if old in text]
            if len(where) != 1 or mutated[where[0]].count(old) != 1:
                sys.exit(f"mutant {name!r}: {old.strip()!r} is not found once in "
                         f"{', '.join(CODE)}; update run_mutants.py")
            mutated[where[0]] = mutated[where[0]].replace(old, new)
        if args.check:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            copy = os.path.join(scratch, "repo")
            shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
                ".git", "runs", "__pycache__", ".pytest_cache", "viz"))
            for path, text in mutated.items():
                if text != sources[path]:
                    with open(os.path.join(copy, path), "w") as f:
                        f.write(text)
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p",
                                  "no:cacheprovider", *shlex.split(args.tests)], cwd=copy,
                                 capture_output=True, text=True)
        failed = [l.split(" - ")[0].replace("FAILED ", "") for l in out.stdout.splitlines()
                  if l.startswith("FAILED")]
        if out.returncode == 0:
            survived.append(name)
        print(f"{name:46s} {'SURVIVED' if out.returncode == 0 else 'caught by ' + ', '.join(failed)}",
              flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
