"""A CPU speed check of a change to the module: one FF epoch of 3,000 random digits through
train_ff of the module as it was (a file given) and as it is, side by side in one process,
alternating, 5 repeats each; prints each repeat and the medians.

    git show REV:ff_hybrid_mnist.py > /tmp/before/ff_hybrid_mnist.py
    OPENBLAS_NUM_THREADS=1 python3 bench/bench_before_after.py /tmp/before/ff_hybrid_mnist.py
    OPENBLAS_NUM_THREADS=1 python3 bench/bench_before_after.py /tmp/before/ff_hybrid_mnist.py --kind recipe
"""
import argparse
import importlib.util
import os
import statistics
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = {  # FFConfig settings of the epoch timed
    "hybrid": dict(layer_sizes=(784, 1000, 1000, 1000, 1000)),
    "recipe": dict(layer_sizes=(784, 1000, 1000, 1000), negatives="label",
                   hard_negatives=True, hard_from="head", optimizer="sgd", normalize="rms",
                   init="fan-in", goodness="sum", threshold=1.0, peer_kind="author",
                   peer_norm=0.06),
}


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epoch_seconds(ff, settings, x, y):
    cfg = ff.FFConfig(**settings, n_epochs=1, batch_size=100)
    state = ff.FFState.fresh(cfg, np.random.default_rng(2))
    t0 = time.perf_counter()
    ff.train_ff(x, cfg, state, log=lambda *a, **k: None, y_train=y)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", help="the module file as it was")
    p.add_argument("--kind", choices=KINDS, default="hybrid")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    versions = {"before": load(args.before, "ff_before"),
                "after": load(os.path.join(HERE, "..", "ff_hybrid_mnist.py"), "ff_after")}
    rng = np.random.default_rng(0)
    x, y = rng.random((3000, 784)).astype(np.float32), rng.integers(0, 10, 3000)
    seconds = {name: [] for name in versions}
    for rep in range(args.repeats):
        order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
        for name in order:
            seconds[name].append(epoch_seconds(versions[name], KINDS[args.kind], x, y))
        print(f"repeat {rep + 1}: " + "  ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items()),
              flush=True)
    before, after = (statistics.median(seconds[n]) for n in ("before", "after"))
    print(f"{args.kind}: median epoch of 3,000 digits: before {before:.3f} s, after "
          f"{after:.3f} s, after / before {after / before:.3f}")


if __name__ == "__main__":
    main()
