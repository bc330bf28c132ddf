"""A locally-connected network in block form against the dense network of the same size.

The paper's locally-connected network, --local 10:6:128,2:1:220,2:1:512 (784-2048-1980-2048),
holds 3.0 M weights; the dense 784-2048-1980-2048 holds 9.7 M and costs what the masked form
of the locally-connected network cost (the same products, the same Adam, plus the mask).
Both train through train_ff for a fixed number of steps, alternately, from the same seed;
the times are scaled to an epoch of 60000 digits, and the ratio dense / blocks is the
median of the ratios of the pairs (a machine whose speed drifts moves both of a pair).

    python3 -m bench.bench_local                          # the paper's shapes, 5 pairs
    OPENBLAS_NUM_THREADS=1 python3 -m bench.bench_local   # one BLAS thread
"""

import argparse
import os
import time

import numpy as np

import ff_hybrid_mnist as ff
import ff_runs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local", default="10:6:128,2:1:220,2:1:512")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=5, help="pairs of timings")
    args = p.parse_args()

    blocks = ff.FFConfig(local=args.local, batch_size=args.batch_size, top_k=1, n_epochs=1)
    dense = ff.FFConfig(layer_sizes=blocks.layer_sizes, batch_size=args.batch_size, top_k=1,
                        n_epochs=1)
    B = args.batch_size
    x_train = ff.load_mnist()[0][:args.steps * B]
    per_epoch = ff.N_TRAIN_MAX // B / args.steps  # timed steps -> an epoch of 60000 digits
    quiet = lambda *a, **k: None

    def epoch_seconds(cfg, x):
        state = ff.FFState.fresh(cfg, np.random.default_rng(0))
        t0 = time.perf_counter()
        ff.train_ff(x, cfg, state, log=quiet)
        return (time.perf_counter() - t0) * per_epoch

    for cfg in (blocks, dense):  # warm-up: BLAS threads, page faults of the buffers
        epoch_seconds(cfg, x_train[:5 * B])
    times = {"blocks": [], "dense": []}
    for _ in range(args.repeats):
        times["blocks"].append(epoch_seconds(blocks, x_train))
        times["dense"].append(epoch_seconds(dense, x_train))
    ratios = np.array(times["dense"]) / np.array(times["blocks"])

    n_weights = {"blocks": sum(W.size for W in ff.FFState.fresh(blocks, np.random.default_rng(0))
                               .weights),
                 "dense": sum(a * b for a, b in zip(dense.layer_sizes[:-1], dense.layer_sizes[1:]))}
    env = ff_runs.environment()
    print(f"--local {args.local} (layers {'-'.join(map(str, blocks.layer_sizes))}) against "
          f"dense {'-'.join(map(str, dense.layer_sizes))}; batch {B}+{B}; {args.steps} steps "
          f"per timing scaled to an epoch of {ff.N_TRAIN_MAX} digits; {args.repeats} pairs")
    print(f"commit {env['commit']}, numpy {np.__version__}, {env['cpu_count']} CPUs "
          f"({env['cpu']}), OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    for name in ("blocks", "dense"):
        t = times[name]
        print(f"{name:6s} {n_weights[name] / 1e6:5.2f} M weights: median {np.median(t):7.2f} "
              f"s/epoch  (each: {' '.join(f'{v:.2f}' for v in t)})")
    print(f"ratio dense / blocks: median of the pairs {np.median(ratios):.2f} "
          f"(each: {' '.join(f'{r:.2f}' for r in ratios)}); "
          f"weights {n_weights['dense'] / n_weights['blocks']:.2f}x fewer")


if __name__ == "__main__":
    main()
