"""Devices and CPU speed, the one place for them: the array module of a run, and Adam's
passes on the CPU (threaded chunks) and on the GPU (one fused kernel). Both do, per element,
what Adam.step's docstring in ff_hybrid_mnist.py says, in the same order. The maths in the
experiment scripts stays device-generic: every function takes its array module from its
arguments (xp_of), so --device gpu runs the same code on CuPy arrays."""

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # optional: --device gpu runs the same functions on CuPy arrays
    import cupy
except ImportError:
    cupy = None


def xp_of(*arrays):
    """numpy, or CuPy when any of the arrays lives on the GPU."""
    return cupy.get_array_module(*arrays) if cupy is not None else np


def array_module(device):
    return cupy if device == "gpu" else np


def to_host(a):
    """a as a numpy array: a GPU array is copied back, a numpy array is returned as it is."""
    return cupy.asnumpy(a) if cupy is not None else a


def move_state(state, xp):
    """Every array of a run's state (ff_hybrid_mnist.FFState) moved into xp's memory (numpy:
    the host), in place: parameters, peer means, a head trained along, the optimisers'
    arrays (Adam's moments, the smoothed gradient; not the CPU's Adam scratch). Returns it."""
    move = to_host if xp is np else xp.asarray
    for name in ("weights", "biases", "peer_means", "head"):
        if getattr(state, name) is not None:
            setattr(state, name, [move(a) for a in getattr(state, name)])
    for opt in state.opt_w + state.opt_b + (state.head_opt or []):
        for key, value in vars(opt).items():
            if key != "scratch" and isinstance(value, np.ndarray if cupy is None
                                               else (np.ndarray, cupy.ndarray)):
                setattr(opt, key, move(value))
    return state


def row_squares(x):
    """sum_j x_ij^2 of each row: einsum on the CPU (no temporary); on the GPU a product and a
    reduction, two launches, where CuPy's einsum costs several times their host time."""
    xp = xp_of(x)
    return np.einsum("ij,ij->i", x, x) if xp is np else (x * x).sum(axis=1)


def gpu_problem():
    """Why --device gpu cannot run here, in one line; None when CuPy can use a GPU."""
    if cupy is None:
        return ("--device gpu needs CuPy, which is not installed "
                "(pip install -r requirements-gpu.txt, or use the CuPy a GPU machine has)")
    try:  # a device, its driver, the kernel compiler (NVRTC) and cuBLAS must all answer
        int((cupy.arange(2) + 1).sum())
        a = cupy.ones((4, 4), np.float32)
        float((a @ a).sum())
        adam_kernel()(a, 1.0, 0.9, 0.999, 0.01, 1e-8, 0.0, a.copy(), a.copy(), a.copy())
    except Exception as e:  # no driver, no device, a CUDA mismatch: each raises its own kind
        detail = (str(e).splitlines() or [""])[0]
        return (f"--device gpu: CuPy {cupy.__version__} cannot use a GPU here "
                f"({e.__class__.__name__}: {detail})")
    return None


ADAM_CHUNK = 1 << 18    # elements: 1 MiB of float32 per array (bench/bench_adam.py)


ADAM_THREADS = 2


_ADAM_POOL = []


def _adam_pool():
    """The worker threads of Adam's chunked passes, started on first use."""
    if not _ADAM_POOL:
        _ADAM_POOL.append(ThreadPoolExecutor(ADAM_THREADS, thread_name_prefix="adam"))
    return _ADAM_POOL[0]


def adam_scratch(param):
    """The buffers of adam_cpu's passes over param: one chunk for each thread."""
    size = min(param.size, ADAM_CHUNK)
    return [np.empty(size, param.dtype) for _ in range(ADAM_THREADS)]


def adam_cpu(param, grad, m_acc, v_acc, decay, b1, b2, step_size, eps, flush_below, scratch):
    """The passes run over chunks of ADAM_CHUNK elements, so that a chunk of p, g, m, v and
    the scratch stays in cache through all ten instead of each pass streaming the whole layer
    from memory; large parameters are split between ADAM_THREADS threads (numpy releases the
    GIL). Every element sees the same operations either way, so the result is bit for bit
    that of one pass over the whole array."""
    if not (param.flags.c_contiguous and grad.flags.c_contiguous):
        raise ValueError("Adam updates contiguous arrays only")  # reshape would copy
    flat = [a.reshape(-1) for a in (param, grad, m_acc, v_acc)]
    n = flat[0].size
    bounds = [(s, min(s + ADAM_CHUNK, n)) for s in range(0, n, ADAM_CHUNK)]
    args = (flat, decay, b1, b2, step_size, eps, flush_below)
    if len(bounds) < 2 * ADAM_THREADS:
        _adam_chunks(bounds, scratch[0], *args)
    else:
        share = -(-len(bounds) // ADAM_THREADS)
        jobs = [_adam_pool().submit(_adam_chunks, bounds[i * share:(i + 1) * share],
                                    scratch[i], *args) for i in range(ADAM_THREADS)]
        for job in jobs:
            job.result()


def _adam_chunks(bounds, scratch, flat, decay, b1, b2, step_size, eps, flush_below):
    for lo, hi in bounds:
        p, g, m, v = (a[lo:hi] for a in flat)
        tmp = scratch[:hi - lo]
        if decay != 1.0:
            p *= decay
        m *= b1
        m += g
        v *= b2
        np.multiply(g, g, out=tmp)
        v += tmp
        np.sqrt(v, out=tmp)
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp
        if flush_below:
            for moment in (m, v):
                np.abs(moment, out=tmp)
                np.putmask(moment, tmp < flush_below, 0)


@functools.lru_cache(maxsize=None)
def adam_kernel():
    """On the GPU the ten passes are one elementwise kernel: each element is read and written
    once per step instead of ten times. Called (grad, decay, b1, b2, step_size, eps,
    flush_below, param, m_acc, v_acc); the scalars take the arrays' dtype."""
    return cupy.ElementwiseKernel(
        "T g, T decay, T b1, T b2, T step_size, T eps, T flush_below", "T p, T m, T v",
        """
        p *= decay;
        m = m * b1 + g;
        v = v * b2 + g * g;
        p -= step_size * (m / (sqrt(v) + eps));
        if (fabs(m) < flush_below) m = 0;
        if (fabs(v) < flush_below) v = 0;
        """, "ff_adam_step")
