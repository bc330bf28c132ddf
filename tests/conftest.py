import os

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_runs


def layer_step(x, W, b, n_pos, threshold, goodness_kind="mean", peer_coef=0.0, peer_mean=None,
               peer_kind="spread", kind=None, work=None):
    """One layer's FF loss and gradient, composed from the module's pieces as
    train_layer_step composes them: (loss, dW, db, h, g, r); r is None without peer
    normalisation. kind: the layer's kind (None: dense; a locally-connected layer's
    ff_local.LocalLayer, W its blocks). Buffers are allocated here unless `work` is given."""
    work = work or ff.LayerWork.allocate(len(x), x.shape[1], len(b), kind=kind)
    if work.h.dtype != x.dtype:  # the float64 checks
        work = ff.LayerWork(*(None if a is None else np.empty(a.shape, x.dtype)
                              for a in (work.h, work.dz, work.dW, work.fields)))
    h = ff.layer_forward(x, W, b, out=work.h, kind=kind, fields=work.fields)
    loss, g = ff.ff_loss_and_dz(h, n_pos, threshold, goodness_kind, work.dz)
    r = None
    if peer_coef > 0:
        extra, r = ff.PEER[peer_kind](h, n_pos, peer_mean, peer_coef, work.dz)
        loss += extra
    dW, db = ff.layer_grads(x, work.dz, work.dW, kind, work.fields)
    return loss, dW, db, h, g, r


def read_mnist_once(load):
    """load_mnist that reads the repository's MNIST once for the whole session: a call
    without a data folder (every run and figure script the tests start in this process) gets
    the same read-only arrays; any other call (the loader's own tests) reads as usual."""
    cached = []

    def load_mnist(*args, **kwargs):
        given = list(args) + list(kwargs.values())
        if any(v is not None for v in given) or set(kwargs) - {"data_dir"} or len(args) > 1 \
                or os.environ.get("MNIST_DIR"):
            return load(*args, **kwargs)
        if not cached:
            cached.extend(load())
            for a in cached:
                a.setflags(write=False)
        return tuple(cached)
    load_mnist.__wrapped__ = load
    return load_mnist


ff.load_mnist = read_mnist_once(ff.load_mnist)


@pytest.fixture(scope="session")
def mnist():
    """(x_train, y_train, x_test, y_test), read once for the whole session."""
    return ff.load_mnist()

TINY = ["--layer-sizes", "784,40,30,20", "--n-train", "600", "--batch-size", "50",
        "--head", "sgd", "--softmax-epochs", "2", "--top-k", "2"]  # a whole run in about a second
TINY_NO_HEAD = [a for a in TINY if a not in ("--head", "sgd")]  # with --softmax-epochs 0
TINY_LINE = ("--layer-sizes 784,30,20 --n-epochs 1 --n-train 300 --batch-size 50 "
             "--head sgd --softmax-epochs 2 --top-k 1")  # the flags of a sweep line, smaller still
QUIET = {"log": lambda *a, **k: None}


def one_line(err):
    """err, after checking that it is one 'error: ...' line and no traceback."""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


class StopTraining(Exception):
    """Raised by an epoch callback to stop a run the way a kill would, checkpoint kept."""


def run_cut_after(out, flags, epochs=1):
    """Start the run of `flags` in folder `out` and stop it after `epochs` FF epochs."""
    def stop(epoch, state):
        if epoch + 1 >= epochs:
            raise StopTraining
    with pytest.raises(StopTraining):
        ff_runs.run_experiment(ff_runs.parse_args(flags + ["--out", str(out)]), callback=stop, **QUIET)


CONVERGED_FLAGS = ["--n-epochs", "1", "--val-size", "300"]  # with TINY_NO_HEAD: the default head


@pytest.fixture(scope="session")
def converged_run(tmp_path_factory):
    """(run folder, what it printed) of one tiny run read out by the converged head, the
    default; trained once for every test that reads such a run."""
    import contextlib
    import io
    out = tmp_path_factory.mktemp("converged") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert ff.main(TINY_NO_HEAD + CONVERGED_FLAGS + ["--out", str(out)]) == 0
    return str(out), printed.getvalue()
