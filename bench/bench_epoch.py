"""How close is an FF epoch to its matrix-product floor?

Per layer and batch an FF step needs exactly two products over the stacked batch of
B positives and B hybrids: the forward product (2B x in)(in x out) and the weight-gradient
product (in x 2B)(2B x out). This script times those products alone (the floor), then full
epochs of the real training loop at the same shapes, and the parts of one step.

    python3 -m bench.bench_epoch                                   # the SPEC shapes
    python3 -m bench.bench_epoch --layer-sizes 784,2000,2000,2000,2000
    python3 -m bench.bench_epoch --device gpu                      # CuPy, timed with syncs
"""

import argparse
import resource
import sys
import time

import numpy as np

import ff_hybrid_mnist as ff
import ff_devices
import ff_runs

cupy = ff_devices.cupy


def cupy_sync():
    cupy.cuda.Device().synchronize()


def best_of(fn, repeats):
    """Smallest wall-clock of `repeats` calls of fn, in seconds."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer-sizes", type=ff_runs.layer_sizes_arg, default=ff.FFConfig().layer_sizes)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--n-train", type=int, default=60000)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up")
    p.add_argument("--repeats", type=int, default=5, help="repeats of each floor/part timing")
    p.add_argument("--part-steps", type=int, default=50, help="steps per part timing")
    p.add_argument("--device", choices=ff.DEVICES, default="cpu")
    args = p.parse_args()
    if args.device == "gpu" and ff_devices.gpu_problem():
        print(f"error: {ff_devices.gpu_problem()}", file=sys.stderr)
        sys.exit(2)
    gpu = args.device == "gpu"
    xp = ff.array_module(args.device)
    # the GPU queues work and returns at once: every timing waits for it to finish
    sync = cupy_sync if gpu else (lambda: None)

    x_train = xp.asarray(ff.load_mnist()[0][:args.n_train])
    cfg = ff.FFConfig(layer_sizes=args.layer_sizes, batch_size=args.batch_size, top_k=1,
                      device=args.device)
    B, sizes = args.batch_size, args.layer_sizes
    n_batches = len(x_train) // B
    rng = np.random.default_rng(0)
    shapes = list(zip(sizes[:-1], sizes[1:]))
    xs = [ff.l2_normalize(xp.asarray(rng.random((2 * B, n_in), dtype=np.float32)))
          for n_in, _ in shapes]
    Ws = [xp.asarray(rng.standard_normal((n_in, n_out), dtype=np.float32)) for n_in, n_out in shapes]
    hs = [xp.empty((2 * B, n_out), np.float32) for _, n_out in shapes]
    dWs = [xp.empty_like(W) for W in Ws]

    def products(n_steps):
        for _ in range(n_steps):
            for x, W, h, dW in zip(xs, Ws, hs, dWs):
                xp.matmul(x, W, out=h)
                xp.matmul(x.T, h, out=dW)
        sync()

    steps = args.part_steps
    products(2)  # warm-up: cuBLAS handles and kernels are made on first use
    floor = best_of(lambda: products(steps), args.repeats) / steps * n_batches

    # the parts of one step, each timed alone over `steps` steps
    bs = [xp.zeros(n_out, np.float32) for _, n_out in shapes]
    work = [ff.LayerWork.allocate(2 * B, n_in, n_out, xp) for n_in, n_out in shapes]
    adams = [ff.Adam(W) for W in Ws]
    idx = rng.permutation(len(x_train))
    batch = xp.empty((2 * B, sizes[0]), np.float32)

    def masks():
        for i in range(steps):
            sl = idx[i * B:(i + 1) * B]
            batch[:B] = x_train[sl]
            ff.make_hybrid_batch(x_train[sl[::-1]], x_train[sl], rng, cfg.n_blur, out=batch[B:])
        sync()

    def layer_maths():
        for _ in range(steps):
            for l, (x, W) in enumerate(zip(xs, Ws)):
                h = ff.layer_forward(x, W, bs[l], out=work[l].h)
                ff.ff_loss_and_dz(h, B, cfg.threshold, cfg.goodness, work[l].dz)
                ff.layer_grads(x, work[l].dz, work[l].dW)
        sync()

    def adam():
        for _ in range(steps):
            for W, dW, opt in zip(Ws, dWs, adams):
                opt.step(W, dW, 1e-9)
        sync()

    for part in (masks, layer_maths, adam):  # warm-up: kernels compile on first use
        part()

    parts = {"mask + hybrids": best_of(masks, args.repeats) / steps,
             "layer maths incl. products": best_of(layer_maths, args.repeats) / steps,
             "adam": best_of(adam, args.repeats) / steps}
    product_step = floor / n_batches
    parts["layer elementwise"] = parts.pop("layer maths incl. products") - product_step
    parts = {"products": product_step, **parts}

    # the real loop: one warm-up epoch on a slice, then full epochs (an epoch's time ends
    # with its one read-back, so on the GPU it includes all the epoch's work)
    del xs, hs, dWs, work, adams, bs, batch
    pool = cupy.get_default_memory_pool() if gpu else None
    if gpu:
        pool.free_all_blocks()  # what is left in the pool from here on is training's
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    quiet = lambda *a, **k: None
    ff.train_ff(x_train[:20 * B], ff.FFConfig(**{**cfg.__dict__, "n_epochs": 1}), state, log=quiet)
    state = ff.FFState.fresh(cfg, np.random.default_rng(0))
    timed = ff.FFConfig(**{**cfg.__dict__, "n_epochs": args.epochs})
    ff.train_ff(x_train, timed, state, log=quiet)
    epoch = min(state.history["seconds"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the pool keeps every block it was given, so its total is training's peak (plus the
    # training images and the floor's weights, still alive)
    gpu_peak = pool.total_bytes() / 2 ** 20 if gpu else None

    # (after the peak is read: the array below is the benchmark's, not training's)
    # Adam cannot beat memory: per weight it reads p, g, m, v and writes p, m, v (28 bytes of
    # float32) every step. Stream bandwidth is timed as an in-place add over a 256 MB array
    # split between Adam's threads, the cheapest read-plus-write pass numpy has.
    big = xp.ones(1 << 26, np.float32)  # touched, so no page faults are timed
    if gpu:
        def add():
            xp.add(big, 1.0, out=big)
            sync()
        add()
    else:
        halves = np.array_split(big, ff_devices.ADAM_THREADS)
        add = lambda: list(ff_devices._adam_pool().map(lambda a: np.add(a, 1.0, out=a), halves))
    bandwidth = 2 * big.nbytes / best_of(add, args.repeats)
    del big
    n_weights = sum(n_in * n_out for n_in, n_out in shapes)
    adam_bound = 28 * n_weights / bandwidth * n_batches

    env = ff_runs.environment(args.device)
    print(f"layers {'-'.join(map(str, sizes))}  batch {B}+{B}  n_train {len(x_train)}  "
          f"numpy {np.__version__}  device {args.device}"
          + (f" ({env['gpu']}, CuPy {env['cupy']}, CUDA runtime {env['cuda_runtime']})"
             if gpu else ""))
    print(f"floor (2 products/layer/batch, best of {args.repeats}): {floor:7.2f} s/epoch")
    print(f"training loop (best of {args.epochs} epochs):          {epoch:7.2f} s/epoch")
    print(f"ratio epoch/floor: {epoch / floor:.3f}")
    print(f"memory bandwidth (in-place add{'' if gpu else f', {ff_devices.ADAM_THREADS} threads'}): "
          f"{bandwidth / 1e9:.1f} GB/s; "
          f"Adam's 28 bytes/weight/step alone take >= {adam_bound:.2f} s/epoch, so no loop "
          f"with Adam beats ratio {(floor + adam_bound) / floor:.3f} here")
    print(f"samples/s (positives + hybrids): {2 * n_batches * B / epoch:,.0f}")
    print(f"peak resident memory: {peak:.0f} MiB")
    if gpu:
        print(f"peak GPU memory (CuPy memory pool total): {gpu_peak:.0f} MiB")
    total = sum(parts.values())
    print("one step, parts timed alone:")
    for name, sec in parts.items():
        print(f"  {name:18s} {1e3 * sec:7.2f} ms  {100 * sec / total:5.1f}%")


if __name__ == "__main__":
    main()
