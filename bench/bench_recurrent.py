"""The recurrent network's epoch against the feed-forward one at the same widths.

A step of ff_recurrent_mnist.py runs the bottom-up pass and 8 damped iterations, each layer's
product over both its neighbours, and the weight gradients over the 8 iterations; a step of
ff_hybrid_mnist.py is one forward product and one gradient product per layer (and the
hybrids). Both train through train_ff for a fixed number of steps, alternately, in this
process; the times are scaled to an epoch of 50,000 digits (--val-size 10000), and the ratio
recurrent / hybrid is the median of the pairs' ratios (a busy machine that drifts moves both
of a pair). Then the goodness read-out of 1,000 digits (10 labels, 5 iterations each),
scaled to the 20,000 of the validation and test splits.

    OPENBLAS_NUM_THREADS=1 python3 -m bench.bench_recurrent --layer-sizes 784,500,500
"""

import argparse
import os
import time

import numpy as np

import ff_hybrid_mnist as ff
import ff_recurrent_mnist as rec
import ff_runs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer-sizes", type=ff_runs.layer_sizes_arg, default=(784, 500, 500))
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=40, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="pairs of timings")
    p.add_argument("--readout-digits", type=int, default=1000)
    args = p.parse_args()

    fields = dict(layer_sizes=args.layer_sizes, batch_size=args.batch_size, n_epochs=1)
    configs = {"recurrent": rec.RecurrentConfig(**fields),
               "hybrid": ff.FFConfig(**fields, top_k=1)}
    x_train, y_train, x_test, y_test = ff.load_mnist()
    B = args.batch_size
    x_train, y_train = x_train[:args.steps * B], y_train[:args.steps * B]
    per_epoch = 50000 // B / args.steps  # timed steps -> an epoch of 50,000 digits
    quiet = lambda *a, **k: None  # noqa: E731

    def epoch_seconds(cfg, n):
        state = ff.FFState.fresh(cfg, np.random.default_rng(0))
        t0 = time.perf_counter()
        ff.train_ff(x_train[:n], cfg, state, log=quiet, y_train=y_train[:n])
        return (time.perf_counter() - t0) * per_epoch * len(x_train) / n

    for cfg in configs.values():  # warm-up: BLAS threads, page faults of the buffers
        epoch_seconds(cfg, 5 * B)
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            times[name].append(epoch_seconds(cfg, len(x_train)))
    ratios = np.array(times["recurrent"]) / np.array(times["hybrid"])
    cfg = configs["recurrent"]
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    t0 = time.perf_counter()
    rec.goodness_per_label(state.weights, state.biases, x_test[:args.readout_digits], cfg)
    readout = (time.perf_counter() - t0) * 20000 / args.readout_digits

    env = ff_runs.environment()
    print(f"layers {'-'.join(map(str, args.layer_sizes))}, batch {B}, {args.steps} steps a "
          f"timing, {args.repeats} pairs; {env['cpu']}, {env['cpu_count']} cores, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in configs:
        print(f"{name:9s} epoch of 50,000 digits: median {np.median(times[name]):6.1f} s  "
              f"(each: {', '.join(f'{t:.1f}' for t in times[name])})")
    print(f"recurrent / hybrid: median {np.median(ratios):.2f} "
          f"(each: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"goodness read-out of 20,000 digits (validation and test): {readout:.1f} s")


if __name__ == "__main__":
    main()
