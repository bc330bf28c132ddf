"""A CPU speed check of a change to the code: one FF epoch of 3,000 random digits through
train_ff of the code as it was (the ff_hybrid_mnist.py of a checkout of it, given) and as it
is, side by side in one process, alternating, 5 repeats each; prints each repeat and the
medians. The recipe epoch is a label run: ff_label_mnist.py's since the scripts were split,
the one module's --negatives label before. The code as it was is loaded from the path given
(importlib, as ff_before); the code as it is, from the repository root this runs in.

    git worktree add /tmp/before REV
    OPENBLAS_NUM_THREADS=1 python3 -m bench.bench_before_after /tmp/before/ff_hybrid_mnist.py
    OPENBLAS_NUM_THREADS=1 python3 -m bench.bench_before_after /tmp/before/ff_hybrid_mnist.py --kind recipe
"""
import argparse
import importlib
import importlib.util
import statistics
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="ff_hybrid_mnist.py as it was (the old one-module form)")
    p.add_argument("--kind", choices=KINDS, default="hybrid")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    versions = {"before": load(args.before, "ff_before"),
                "after": importlib.import_module("ff_hybrid_mnist")}
    rng = np.random.default_rng(0)
    x, y = rng.random((3000, 784)).astype(np.float32), rng.integers(0, 10, 3000)
    seconds = {name: [] for name in versions}
    for rep in range(args.repeats):
        order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
        for name in order:
            seconds[name].append(epoch_seconds(versions[name], args.kind, x, y))
        print(f"repeat {rep + 1}: " + "  ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items()),
              flush=True)
    before, after = (statistics.median(seconds[n]) for n in ("before", "after"))
    print(f"{args.kind}: median epoch of 3,000 digits: before {before:.3f} s, after "
          f"{after:.3f} s, after / before {after / before:.3f}")


if __name__ == "__main__":
    main()
