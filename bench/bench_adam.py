"""Adam's step time against its chunk size and thread count.

Adam's ten elementwise passes over a layer are memory-bound when each pass streams the
whole layer (p, g, m, v and a scratch: 20 MB at 1000x1000 float32, more than the caches).
Run over chunks, all ten passes work on data already in cache. This script times one
step of every layer's weights for a few chunk sizes and thread counts; the module's
ADAM_CHUNK and ADAM_THREADS are set from it.

    python3 -m bench.bench_adam                                    # the SPEC shapes
    python3 -m bench.bench_adam --layer-sizes 784,2000,2000,2000,2000
"""

import argparse
import time

import numpy as np

import ff_hybrid_mnist as ff
import ff_devices
import ff_runs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer-sizes", type=ff_runs.layer_sizes_arg, default=ff.FFConfig().layer_sizes)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    rng = np.random.default_rng(0)
    shapes = list(zip(args.layer_sizes[:-1], args.layer_sizes[1:]))
    Ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    Gs = [rng.standard_normal(s, dtype=np.float32) * 1e-3 for s in shapes]
    n_params = sum(W.size for W in Ws)
    print(f"layers {'-'.join(map(str, args.layer_sizes))}: {n_params / 1e6:.2f} M weights, "
          f"one Adam step of all of them (best of {args.repeats} x {args.steps} steps)")
    whole = max(W.size for W in Ws)
    for threads in (1, 2):
        for chunk in (whole, 1 << 14, 1 << 16, 1 << 18, 1 << 20):
            ff_devices.ADAM_CHUNK, ff_devices.ADAM_THREADS = chunk, threads
            ff_devices._ADAM_POOL.clear()
            opts = [ff.Adam(W) for W in Ws]
            best = np.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    for W, G, opt in zip(Ws, Gs, opts):
                        opt.step(W, G, 1e-6)
                best = min(best, (time.perf_counter() - t0) / args.steps)
            label = "whole layer" if chunk == whole else f"{chunk:,}"
            print(f"  threads {threads}  chunk {label:>12}  {1e3 * best:6.2f} ms/step  "
                  f"{n_params * 4 * 7 / best / 1e9:5.1f} GB/s of unavoidable traffic")


if __name__ == "__main__":
    main()
