"""A numpy-backed stand-in for CuPy that counts what a GPU would be asked to do.

Its arrays (`DeviceArray`, an ndarray subclass) compute with numpy, and every operation on
them counts as one kernel launch: a ufunc or a reduction, a function of the module, a fancy
gather, a write through `[...] =`, a copying `astype`/`copy`/`reshape`. A host array given
to a device operation is refused as CuPy refuses it, except as an index, where it counts as
an upload (CuPy copies it to the device). `asarray` of a host array counts as an upload;
`asnumpy`, `float()`, `int()`, `bool()`, `.item()` and formatting count as reads back (each
one a wait for the GPU). `calls` counts the module's functions by name.

    fake = CountingCupy(); monkeypatch.setattr(ff_devices, "cupy", fake); ... fake.counts
Used by tests/test_gpu.py (the launch budget of a training step) and bench/count_launches.py.
"""
import types
from collections import Counter

import numpy as np

import ff_devices


class DeviceArray(np.ndarray):
    """An array "on the device" of the stand-in: numpy underneath, every operation counted."""

    module = None  # the CountingCupy that owns the arrays

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        fake = self.module
        fake.launch(f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__)
        inputs = [fake.operand(a) for a in inputs]
        if out is not None:
            kwargs["out"] = tuple(fake.operand(o) for o in out)
        return fake.wrap(getattr(ufunc, method)(*inputs, **kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        return getattr(self.module, func.__name__)(*args, **kwargs)

    def __getitem__(self, key):
        key = self.module.index(key)
        result = np.ndarray.__getitem__(self.view(np.ndarray), key)
        if _fancy(key):
            self.module.launch("gather")
        return self.module.wrap(result)

    def __setitem__(self, key, value):
        self.module.launch("setitem")
        np.ndarray.__setitem__(self.view(np.ndarray), self.module.index(key),
                               self.module.operand(value))

    def astype(self, dtype, copy=True, **kwargs):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        self.module.launch("astype")
        return self.module.wrap(self.view(np.ndarray).astype(dtype, **kwargs))

    def copy(self, order="C"):
        self.module.launch("copy")
        return self.module.wrap(self.view(np.ndarray).copy(order))

    def reshape(self, *shape, **kwargs):
        base = self.view(np.ndarray)
        result = base.reshape(*shape, **kwargs)
        if not np.shares_memory(result, base):
            self.module.launch("reshape-copy")
        return self.module.wrap(result)

    def _read(self):
        self.module.counts["reads"] += 1
        return self.view(np.ndarray)

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def __index__(self):
        return int(self._read())

    def item(self, *args):
        return self._read().item(*args)

    def tolist(self):
        return self._read().tolist()

    def __format__(self, spec):
        return format(self._read()[()] if self.ndim == 0 else self._read(), spec)


def _fancy(key):
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (np.ndarray, list)) for k in keys)


class CountingCupy(types.ModuleType):
    """The stand-in module: numpy's functions, each call counted as one launch."""

    def __init__(self):
        super().__init__("counting_cupy")
        self.__version__ = "0-counting"
        self.ndarray = type("ndarray", (DeviceArray,), {"module": self})
        self.counts = Counter()
        self.calls = Counter()

    def reset(self):
        self.counts.clear()
        self.calls.clear()

    def launch(self, name):
        self.counts["ops"] += 1
        self.calls[name] += 1

    def wrap(self, result):
        if isinstance(result, tuple):
            return tuple(self.wrap(r) for r in result)
        if isinstance(result, (np.ndarray, np.generic)) and not isinstance(result, DeviceArray):
            return np.asarray(result).view(self.ndarray)
        return result

    def operand(self, a):
        """A device array as numpy; a host array (not a scalar) is refused like CuPy does."""
        if isinstance(a, DeviceArray):
            return a.view(np.ndarray)
        if isinstance(a, np.ndarray) and a.ndim > 0:
            raise TypeError("a host numpy array was given to a device operation")
        if isinstance(a, (list, tuple)):
            return type(a)(self.operand(v) for v in a)
        return a

    def index(self, key):
        """An index: device arrays as numpy, host arrays counted as uploads (CuPy copies)."""
        keys = key if isinstance(key, tuple) else (key,)
        out = []
        for k in keys:
            if isinstance(k, DeviceArray):
                k = k.view(np.ndarray)
            elif isinstance(k, (np.ndarray, list)):
                self.counts["uploads"] += 1
                k = np.asarray(k)
            out.append(k)
        return tuple(out) if isinstance(key, tuple) else out[0]

    # -- what the module calls by name ---------------------------------------------------
    def get_array_module(self, *arrays):
        return self if any(isinstance(a, DeviceArray) for a in arrays) else np

    def asarray(self, a, dtype=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        self.counts["uploads"] += 1
        return np.array(a, dtype=dtype).view(self.ndarray)

    def asnumpy(self, a):
        if isinstance(a, DeviceArray):
            self.counts["reads"] += 1
            return np.array(a.view(np.ndarray))
        return np.asarray(a)

    def ElementwiseKernel(self, in_params, out_params, code, name):
        if name != "ff_adam_step":
            raise NotImplementedError(name)

        def adam(g, decay, b1, b2, step_size, eps, flush_below, p, m, v):
            self.launch(name)
            p, m, v, g = (a.view(np.ndarray) for a in (p, m, v, g))
            dt = p.dtype.type
            p *= dt(decay)
            m *= dt(b1)
            m += g
            v *= dt(b2)
            v += g * g
            p -= dt(step_size) * (m / (np.sqrt(v) + dt(eps)))
            m[np.abs(m) < flush_below] = 0
            v[np.abs(v) < flush_below] = 0
        return adam

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value

        def call(*args, **kwargs):
            self.launch(name)
            args = [self.operand(a) for a in args]
            kwargs = {k: self.operand(v) for k, v in kwargs.items()}
            return self.wrap(value(*args, **kwargs))
        return call


# -- counts per training step -------------------------------------------------------------

def _with_fake(measure):
    """measure(fake) with the CuPy of ff_devices (where every module gets it) replaced by a
    fresh stand-in."""
    fake, saved = CountingCupy(), ff_devices.cupy
    ff_devices.cupy = fake
    ff_devices.adam_kernel.cache_clear()
    try:
        return measure(fake)
    finally:
        ff_devices.cupy = saved
        ff_devices.adam_kernel.cache_clear()


def _per_step(fake, epoch_of):
    """Counts per step: an epoch of 4 steps minus one of 2, halved (what is made once an
    epoch cancels; a first epoch of 1 step fills what is cached). Returns (counts, calls)."""
    epoch_of(1)
    fake.reset()
    epoch_of(4)
    c4, n4 = Counter(fake.counts), Counter(fake.calls)
    fake.reset()
    epoch_of(2)
    counts = {k: (c4[k] - fake.counts[k]) / 2 for k in ("ops", "uploads", "reads")}
    calls = {k: (n4[k] - fake.calls[k]) / 2 for k in n4 if n4[k] != fake.calls[k]}
    return counts, calls


def ff_step_counts(ff, settings, batch_size=20, config_class=None):
    """What one FF training step of train_ff asks of the GPU, for the configuration
    config_class(**settings) (default ff.FFConfig; ff_label_mnist.LabelConfig for label
    negatives)."""
    config_class = config_class or ff.FFConfig

    def measure(fake):
        def epoch_of(n_batches):
            cfg = config_class(**settings, n_epochs=1, batch_size=batch_size, device="gpu")
            rng = np.random.default_rng(0)
            x = rng.random((n_batches * batch_size, 784)).astype(np.float32)
            y = rng.integers(0, 10, len(x))
            ff.train_ff(x, cfg, ff.FFState.fresh(cfg, np.random.default_rng(1)),
                        log=lambda *a, **k: None, y_train=y)
        return _per_step(fake, epoch_of)
    return _with_fake(measure)


def head_step_counts(ff, n_features=30, batch_size=20):
    """What one step of the softmax head (train_softmax) asks of the GPU."""
    def measure(fake):
        rng = np.random.default_rng(0)

        def epoch_of(n_batches):
            F = fake.asarray(rng.random((n_batches * batch_size, n_features)).astype(np.float32))
            ff.train_softmax(F, rng.integers(0, 10, len(F)), np.random.default_rng(1), 1, 0.1,
                             1e-4, batch_size=batch_size,
                             log=lambda *a, **k: None)
        return _per_step(fake, epoch_of)
    return _with_fake(measure)
