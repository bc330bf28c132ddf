"""A CPU speed check of a change to the code: one FF epoch of 3,000 random digits through
train_ff of the code as it was (the ff_hybrid_mnist.py of a checkout of it, given) and as it
is, side by side in one process, alternating, 5 repeats each; prints each repeat and the
medians. The recipe epoch is a label run: ff_label_mnist.py's since the scripts were split,
the one module's --negatives label before. The code as it was is loaded from the path given
(importlib, as ff_before); the code as it is, from the repository root this runs in.

    git worktree add /tmp/before REV
    OPENBLAS_NUM_THREADS=1 python3 -m bench.bench_before_after /tmp/before/ff_hybrid_mnist.py
    OPENBLAS_NUM_THREADS=1 python3 -m bench.bench_before_after /tmp/before/ff_hybrid_mnist.py --kind recipe

Between two checkouts of the split scripts (whose variant scripts import their own core),
--tree times each epoch in a fresh process of each checkout instead, alternating; the
timing is inside the process, so its start does not count:

    OPENBLAS_NUM_THREADS=1 python3 -m bench.bench_before_after --tree /tmp/before --kind recipe
"""
import argparse
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import numpy as np

KINDS = {  # the script and configuration of the epoch timed
    "hybrid": ("ff_hybrid_mnist.py", dict(layer_sizes=(784, 1000, 1000, 1000, 1000))),
    "recipe": ("ff_label_mnist.py", dict(
        layer_sizes=(784, 1000, 1000, 1000), hard_negatives=True, hard_from="head",
        optimizer="sgd", normalize="rms", init="fan-in", goodness="sum", threshold=1.0,
        peer_kind="author", peer_norm=0.06)),
}


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(ff, script, settings):
    """The configuration of the epoch: ff_runs' class of the script since the split, the one
    module's FFConfig (with --negatives for a label run) before it."""
    if not hasattr(ff, "FFState") or not hasattr(ff, "load_run"):  # split: load_run is ff_runs'
        return importlib.import_module("ff_runs").config_class(script)(**settings)
    extra = {"negatives": "label"} if script == "ff_label_mnist.py" else {}
    return ff.FFConfig(**settings, **extra)


def epoch_seconds(ff, kind, x, y):
    script, settings = KINDS[kind]
    cfg = config(ff, script, dict(settings, n_epochs=1, batch_size=100))
    state = ff.FFState.fresh(cfg, np.random.default_rng(2))
    t0 = time.perf_counter()
    ff.train_ff(x, cfg, state, log=lambda *a, **k: None, y_train=y)
    return time.perf_counter() - t0


def tree_epoch_seconds(tree, kind):
    """One epoch timed in a fresh process of the checkout at `tree`: its own scripts (this
    file's epoch_seconds and config, sent as source, run on its modules)."""
    import inspect
    code = "\n".join(["import importlib, time", "import numpy as np",
                      "import ff_hybrid_mnist as ff", f"KINDS = {KINDS!r}",
                      inspect.getsource(config), inspect.getsource(epoch_seconds),
                      "rng = np.random.default_rng(0)",
                      "x, y = rng.random((3000, 784)).astype(np.float32), "
                      "rng.integers(0, 10, 3000)",
                      f"epoch_seconds(ff, {kind!r}, x[:300], y[:300])",  # warm-up
                      f"print(epoch_seconds(ff, {kind!r}, x, y))"])
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.split()[-1])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", nargs="?",
                   help="ff_hybrid_mnist.py as it was (the old one-module form)")
    p.add_argument("--tree", help="a checkout of the code as it was, timed in its own processes")
    p.add_argument("--kind", choices=KINDS, default="hybrid")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if (args.before is None) == (args.tree is None):
        p.error("give the old ff_hybrid_mnist.py or --tree, one of them")
    if args.tree:
        versions = {"before": os.path.abspath(args.tree), "after": ROOT}
        time_epoch = tree_epoch_seconds
    else:
        versions = {"before": load(args.before, "ff_before"),
                    "after": importlib.import_module("ff_hybrid_mnist")}
        rng = np.random.default_rng(0)
        x, y = rng.random((3000, 784)).astype(np.float32), rng.integers(0, 10, 3000)

        def time_epoch(ff, kind):
            return epoch_seconds(ff, kind, x, y)
    seconds = {name: [] for name in versions}
    for rep in range(args.repeats):
        order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
        for name in order:
            seconds[name].append(time_epoch(versions[name], args.kind))
        print(f"repeat {rep + 1}: " + "  ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items()),
              flush=True)
    before, after = (statistics.median(seconds[n]) for n in ("before", "after"))
    print(f"{args.kind}: median epoch of 3,000 digits: before {before:.3f} s, after "
          f"{after:.3f} s, after / before {after / before:.3f}")


if __name__ == "__main__":
    main()
