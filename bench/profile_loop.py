"""Where the time of a real training step goes, timed inside the loop.

bench_epoch.py times each part of a step alone; inside the loop the parts slow each other
down (cache evictions, BLAS threads still spinning after a product). This script wraps the
module's Adam step, layer maths, hybrid generation and L2 normalisation with timers and
runs the real `train_ff`, so each part is timed where it actually runs.

    python3 -m bench.profile_loop                        # SPEC shapes, 12,000 digits, 2 epochs
"""

import argparse
import functools
import time

import numpy as np

import ff_hybrid_mnist as ff
import ff_runs


def timed(owner, name, totals):
    """Replace owner.name (owner[name] for a dict) by a wrapper that adds its wall-clock to
    totals[name]."""
    fn = owner[name] if isinstance(owner, dict) else getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

    if isinstance(owner, dict):
        owner[name] = wrapper
    else:
        setattr(owner, name, wrapper)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer-sizes", type=ff_runs.layer_sizes_arg, default=ff.FFConfig().layer_sizes)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--n-train", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()

    x_train = ff.load_mnist()[0][:args.n_train]
    totals = {}
    # train_ff looks these names up in the module at call time, so the wrappers are used
    timed(ff.Adam, "step", totals)
    for name in ("layer_forward", "ff_loss_and_dz", "layer_grads", "make_hybrid_batch"):
        timed(ff, name, totals)
    timed(ff.NORMALIZE, "l2", totals)
    cfg = ff.FFConfig(layer_sizes=args.layer_sizes, batch_size=args.batch_size, top_k=1,
                      n_epochs=args.epochs)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    t0 = time.perf_counter()
    ff.train_ff(x_train, cfg, state, log=lambda *a, **k: None)
    total = time.perf_counter() - t0
    steps = args.epochs * (len(x_train) // args.batch_size)
    totals["everything else"] = total - sum(totals.values())
    print(f"layers {'-'.join(map(str, args.layer_sizes))}  batch {args.batch_size}+"
          f"{args.batch_size}  {steps} steps  {1e3 * total / steps:.2f} ms/step in the loop")
    labels = {"step": "adam (W and b)", "layer_forward": "forward product and ReLU",
              "ff_loss_and_dz": "goodness, loss, dL/dz", "layer_grads": "gradient product",
              "make_hybrid_batch": "mask + hybrids", "l2": "l2 normalise"}
    for name, sec in totals.items():
        print(f"  {labels.get(name, name):28s} {1e3 * sec / steps:7.2f} ms  "
              f"{100 * sec / total:5.1f}%")


if __name__ == "__main__":
    main()
