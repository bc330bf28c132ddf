"""--device gpu: the same functions on CuPy arrays. The tests marked needs_gpu run only where
CuPy can use a GPU (skipped elsewhere, CI included); the rest check, on any machine, what a
CPU-only machine must do with a GPU run or a GPU flag."""
import json
import types

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_devices
import ff_label_mnist as ff_label
import ff_local_mnist as ff_local
import ff_runs
from conftest import QUIET, TINY, TINY_NO_HEAD, one_line, run_cut_after
from counting_cupy import CountingCupy, ff_step_counts, head_step_counts
import visualize_ff_hybrid_mnist as viz

GPU_PROBLEM = ff_devices.gpu_problem()
needs_gpu = pytest.mark.skipif(GPU_PROBLEM is not None, reason=GPU_PROBLEM or "")
cupy = ff_devices.cupy




def moved_apart(got, want, start):
    """|got - want| relative to how far training moved the weights from start."""
    return np.linalg.norm(got - want) / np.linalg.norm(want - start)


# -- on any machine ------------------------------------------------------------------------

def test_xp_of_is_numpy_for_numpy_arrays(monkeypatch):
    a = np.zeros(3, np.float32)
    assert ff_devices.xp_of(a) is np and ff_devices.xp_of(a, np.ones(2)) is np
    assert ff_devices.to_host(a) is a
    monkeypatch.setattr(ff_devices, "cupy", None)  # a machine without CuPy
    assert ff_devices.xp_of(a) is np and ff_devices.to_host(a) is a
    assert ff_devices.array_module("cpu") is np
    # the core and the scripts use ff_devices' own functions, so they see the same CuPy
    assert ff.xp_of is ff_devices.xp_of and ff.to_host is ff_devices.to_host
    assert ff_label.xp_of is ff_devices.xp_of and ff_local.xp_of is ff_devices.xp_of


def test_device_is_a_checked_choice():
    with pytest.raises(ValueError, match="--device tpu is not one of cpu, gpu"):
        ff.FFConfig(device="tpu")


def broken_cupy(*a, **k):
    raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected\nmore")


@pytest.mark.parametrize("fake, words", [
    (None, "needs CuPy, which is not installed"),
    (types.SimpleNamespace(__version__="13.3.0", arange=broken_cupy),
     "CuPy 13.3.0 cannot use a GPU here (RuntimeError: cudaErrorNoDevice"),
])
def test_device_gpu_without_a_usable_gpu_exits_2_before_loading_data(
        fake, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ff_devices, "cupy", fake)
    monkeypatch.setattr(ff, "load_mnist", broken_cupy)  # reading data would be too late
    for extra in ([], ["--dry-run"]):
        assert ff.main(TINY + ["--device", "gpu", "--out", str(tmp_path / "r"), *extra]) == 2
        err = one_line(capsys.readouterr().err)
        assert err.startswith("error: --device gpu") and words in err
    assert not (tmp_path / "r").exists()


def as_if_run_on_the_gpu(run_dir):
    """Rewrites the stored configuration to device gpu: a GPU run's files are host arrays,
    so this is what one looks like to a CPU machine."""
    for name in ("checkpoint.npz", "model.npz"):
        path = run_dir / name
        if path.exists():
            with np.load(path) as z:
                arrays = dict(z)
            arrays["config"] = json.dumps({**json.loads(str(arrays["config"])), "device": "gpu"})
            np.savez(path, **arrays)


def test_a_gpu_run_is_read_and_continued_on_the_cpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ff_devices, "cupy", None)
    mnist = ff.load_mnist()
    monkeypatch.setattr(ff, "load_mnist", lambda data_dir=None: mnist)  # read it once
    flags = TINY_NO_HEAD + ["--softmax-epochs", "0", "--n-epochs", "2", "--n-train", "300"]
    full = ff_runs.run_experiment(ff_runs.parse_args(flags + ["--out", str(tmp_path / "full")]), **QUIET)
    run_cut_after(tmp_path / "cut", flags)
    as_if_run_on_the_gpu(tmp_path / "cut")
    assert ff_runs.read_checkpoint_config(str(tmp_path / "cut"))[0].device == "gpu"
    # without --device it would continue on the GPU, which this machine lacks
    assert ff.main(["--resume", str(tmp_path / "cut")]) == 2
    assert "--device cpu continues the run" in one_line(capsys.readouterr().err)
    assert ff.main(["--resume", str(tmp_path / "cut"), "--device", "cpu"]) == 0
    resumed = ff_runs.load_run(str(tmp_path / "cut"))
    assert resumed.cfg.device == "cpu" and resumed.environment["device"] == "cpu"
    for got, want in zip(resumed.weights, ff_runs.load_run(full.run_dir).weights):
        np.testing.assert_array_equal(got, want)
    as_if_run_on_the_gpu(tmp_path / "cut")
    assert ff_runs.load_run(str(tmp_path / "cut")).cfg.device == "gpu"  # readable here


# What one step may ask of a GPU, counted over tests/counting_cupy.py's stand-in for CuPy
# (bench/count_launches.py prints the counts): no host copy, no read back, no einsum, and no
# more operations than the cuts reached. Before them a step made 185 / 139 / 276 operations
# and 5 / 4 / 6 uploads, the recipe's 2 reads, the softmax head's 2 uploads and 3 reads.
RECIPE = dict(hard_negatives=True, hard_from="head", optimizer="sgd",  # ff_label.LabelConfig
              normalize="rms", init="fan-in", goodness="sum", threshold=1.0,
              peer_kind="author", peer_norm=0.06)
STEP_BUDGETS = {
    "hybrid, 4 layers": (ff.FFConfig, dict(layer_sizes=(784, 24, 24, 24, 24)), 133),
    "label, 3 layers": (ff_label.LabelConfig, dict(layer_sizes=(784, 24, 24, 24)), 99),
    "recipe, 3 layers": (ff_label.LabelConfig, dict(layer_sizes=(784, 24, 24, 24), **RECIPE),
                         255),
}


@pytest.mark.parametrize("kind", STEP_BUDGETS)
def test_a_training_step_stays_within_its_launch_budget(kind):
    config_class, settings, budget = STEP_BUDGETS[kind]
    counts, calls = ff_step_counts(ff, settings, config_class=config_class)
    assert counts["uploads"] == 0 and counts["reads"] == 0, counts
    assert "einsum" not in calls
    assert 0 < counts["ops"] <= budget, (counts, calls)


def test_a_softmax_head_step_stays_on_the_device():
    counts, _ = head_step_counts(ff)
    assert counts["uploads"] == 0 and counts["reads"] == 0, counts
    assert 0 < counts["ops"] <= 38, counts


def test_the_stand_in_counts_what_a_step_would_copy_or_read():
    fake = CountingCupy()
    a = fake.asarray(np.arange(6.0))
    a[np.array([1, 2])]      # a host index: copied to the device
    float(a.sum())           # a read back
    a * 2                    # a launch
    assert fake.counts == {"uploads": 2, "reads": 1, "ops": 3}
    with pytest.raises(TypeError):
        a + np.ones(6)       # CuPy refuses a host operand


@pytest.mark.parametrize("config_class, settings", [
    (ff.FFConfig, dict(layer_sizes=(784, 24, 16), top_k=2, peer_norm=0.1)),
    (ff_label.LabelConfig, dict(layer_sizes=(784, 24, 16), top_k=2, **RECIPE))],
    ids=["hybrid", "recipe"])
def test_the_gpu_code_path_trains_the_cpu_weights_on_the_stand_in(monkeypatch, config_class,
                                                                  settings):
    """The GPU branches (draws moved once an epoch, sums read once, checks at the epoch's
    end) compute what the CPU does: on the numpy-backed stand-in, bit for bit, once both
    sum squares the same way (the CPU's einsum adds in another order than x * x summed)."""
    monkeypatch.setattr(ff, "row_squares", lambda x: (x * x).sum(axis=1))
    rng = np.random.default_rng(0)
    x, y = rng.random((200, 784)).astype(np.float32), rng.integers(0, 10, 200)
    states = {}
    for device in ("cpu", "gpu"):
        fake = CountingCupy()
        monkeypatch.setattr(ff_devices, "cupy", fake)
        ff_devices.adam_kernel.cache_clear()
        cfg = config_class(**settings, n_epochs=2, batch_size=20, device=device)
        states[device] = ff.train_ff(x, cfg, ff.FFState.fresh(cfg, np.random.default_rng(1)),
                                     y_train=y, **QUIET).to(np)
        assert fake.counts["ops"] > 0 if device == "gpu" else not fake.counts
    ff_devices.adam_kernel.cache_clear()
    cpu, gpu = states["cpu"], states["gpu"]
    for got, want in zip(gpu.weights + gpu.biases + gpu.peer_means,
                         cpu.weights + cpu.biases + cpu.peer_means):
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)
    untimed = lambda history: {k: v for k, v in history.items() if k != "seconds"}
    assert untimed(gpu.history) == untimed(cpu.history)


# -- on a GPU ------------------------------------------------------------------------------

@needs_gpu
def test_masks_on_the_gpu_are_the_cpu_masks():
    # exact: the bits come from the host generator and every blur sum is exact in float32
    # (unless CUPY_TF32=1 lets cuBLAS round the products)
    for n_blur in (1, 6, 8):
        cpu = ff.make_masks(64, np.random.default_rng(3), n_blur)
        gpu = ff.make_masks(64, np.random.default_rng(3), n_blur, xp=cupy)
        assert isinstance(gpu, cupy.ndarray)
        np.testing.assert_array_equal(cupy.asnumpy(gpu), cpu)


@needs_gpu
@pytest.mark.parametrize("config_class, changes", [
    (ff.FFConfig, {}), (ff_label.LabelConfig, {}),
    (ff_label.LabelConfig, {"hard_negatives": True}),
    (ff_label.LabelConfig, {"hard_negatives": True, "hard_from": "head"}),
    (ff.FFConfig, {"peer_norm": 0.1, "refresh_inputs": True, "weight_decay": 0.01})],
    ids=["hybrid", "label", "label-hard", "label-hard-head", "hybrid-peer-refresh-decay"])
def test_one_training_step_on_the_gpu_matches_the_cpu(config_class, changes):
    """Same seed: the same start weights, pairs, masks and labels (all drawn on the host)."""
    x_train, y_train = (a[:50] for a in ff.load_mnist()[:2])
    result = {}
    for device in ("cpu", "gpu"):
        cfg = config_class(layer_sizes=(784, 40, 30, 20), n_epochs=1, batch_size=50,
                           n_train=50, device=device, **changes)
        state = ff.FFState.fresh(cfg, np.random.default_rng(0))
        start = [W.copy() for W in state.weights]
        ff.train_ff(x_train, cfg, state, y_train=y_train, **QUIET)
        assert isinstance(state.weights[0], cupy.ndarray if device == "gpu" else np.ndarray)
        result[device] = ([ff_devices.to_host(W) for W in state.weights], state.history)
    (w_cpu, h_cpu), (w_gpu, h_gpu) = result["cpu"], result["gpu"]
    for l in range(3):
        assert moved_apart(w_gpu[l], w_cpu[l], start[l]) < 1e-4, f"layer {l + 1}"
    np.testing.assert_allclose(h_gpu["loss"], h_cpu["loss"], rtol=1e-5)


@needs_gpu
def test_a_locally_connected_epoch_on_the_gpu_matches_the_cpu():
    """The block form on CuPy arrays: the gathered fields, the batched products (forward and
    dW) and the features read through the same forward pass."""
    x_train = ff.load_mnist()[0][:100]
    result = {}
    for device in ("cpu", "gpu"):
        cfg = ff_local.LocalConfig(local="10:6:4,2:1:5", top_k=2, n_epochs=1, batch_size=50,
                                   n_train=100, device=device)
        state = ff.FFState.fresh(cfg, np.random.default_rng(0))
        start = [W.copy() for W in state.weights]
        ff.train_ff(x_train, cfg, state, **QUIET)
        assert isinstance(state.weights[0], cupy.ndarray if device == "gpu" else np.ndarray)
        F = ff.extract_features(state.weights, state.biases, x_train, 2,
                                kinds=cfg.layer_kinds())
        result[device] = ([ff_devices.to_host(W) for W in state.weights], state.history,
                          ff_devices.to_host(F))
    (w_cpu, h_cpu, f_cpu), (w_gpu, h_gpu, f_gpu) = result["cpu"], result["gpu"]
    for l in range(2):
        assert moved_apart(w_gpu[l], w_cpu[l], start[l]) < 1e-4, f"layer {l + 1}"
    np.testing.assert_allclose(h_gpu["loss"], h_cpu["loss"], rtol=1e-5)
    np.testing.assert_allclose(f_gpu, f_cpu, rtol=1e-4, atol=1e-5)


@needs_gpu
def test_adam_kernel_matches_numpy_adam():
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal((37, 11)).astype(np.float32)
    grads = [(rng.standard_normal((37, 11)) * 10 ** rng.uniform(-9, 1, (37, 11)))
             .astype(np.float32) for _ in range(20)]
    # then a gradient that stops: its moments must be flushed to 0 as on the CPU
    grads += [np.full((37, 11), 1e-20, np.float32)] + [np.zeros((37, 11), np.float32)] * 240
    for wd in (0.0, 0.01):
        p_cpu, p_gpu = p0.copy(), cupy.asarray(p0)
        opt_cpu, opt_gpu = ff.Adam(p_cpu, weight_decay=wd), ff.Adam(p_gpu, weight_decay=wd)
        for t, g in enumerate(grads):
            opt_cpu.step(p_cpu, g, 0.01)
            opt_gpu.step(p_gpu, cupy.asarray(g), 0.01)
            if t == 19:
                np.testing.assert_allclose(cupy.asnumpy(p_gpu), p_cpu, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(cupy.asnumpy(opt_gpu.v_acc), opt_cpu.v_acc, rtol=1e-5)
        # 0.9^240 leaves m near 1e-10, above the flush bound: compare with the CPU's moments
        assert opt_gpu.t == opt_cpu.t
        np.testing.assert_allclose(cupy.asnumpy(opt_gpu.m_acc), opt_cpu.m_acc, rtol=1e-4,
                                   atol=1e-30)
        np.testing.assert_array_equal(cupy.asnumpy(opt_gpu.v_acc) == 0, opt_cpu.v_acc == 0)
        np.testing.assert_allclose(cupy.asnumpy(p_gpu), p_cpu, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_tiny_gpu_run_end_to_end_writes_host_files(tmp_path):
    for device in ("cpu", "gpu"):
        out = tmp_path / device
        assert ff.main(TINY + ["--n-epochs", "1", "--device", device, "--out", str(out)]) == 0
    cpu, gpu = ff_runs.load_run(str(tmp_path / "cpu")), ff_runs.load_run(str(tmp_path / "gpu"))
    assert gpu.cfg.device == "gpu" and gpu.environment["device"] == "gpu"
    assert {"gpu", "cupy", "cuda_runtime"} <= set(gpu.environment)
    assert all(type(W) is np.ndarray for W in gpu.weights + list(gpu.head))
    start = ff.init_network(gpu.cfg.layer_sizes, np.random.default_rng(gpu.cfg.seed))[0]
    for l, (got, want) in enumerate(zip(gpu.weights, cpu.weights)):
        assert moved_apart(got, want, start[l]) < 1e-3, f"layer {l + 1}"
    assert abs(gpu.metrics["test_error"] - cpu.metrics["test_error"]) < 0.02
    assert ff_runs.load_checkpoint(str(tmp_path / "gpu"))[1].epochs_done == 1
    # the figures read the GPU run's host files
    assert viz.main(["--run", str(tmp_path / "gpu"), "--outdir", str(tmp_path / "viz")]) == 0


@needs_gpu
def test_resume_on_the_gpu_equals_an_uninterrupted_gpu_run(tmp_path):
    flags = TINY + ["--n-epochs", "2", "--device", "gpu"]
    full = ff_runs.run_experiment(ff_runs.parse_args(flags + ["--out", str(tmp_path / "full")]), **QUIET)

    class Stop(Exception):
        pass

    def stop(epoch, state):
        assert isinstance(state.weights[0], cupy.ndarray)  # it really trains on the GPU
        raise Stop
    with pytest.raises(Stop):
        ff_runs.run_experiment(ff_runs.parse_args(flags + ["--out", str(tmp_path / "cut")]), callback=stop, **QUIET)
    assert ff.main(["--resume", str(tmp_path / "cut")]) == 0  # the run's own device: gpu
    resumed, full = ff_runs.load_run(str(tmp_path / "cut")), ff_runs.load_run(full.run_dir)
    for got, want in zip(resumed.weights + list(resumed.head), full.weights + list(full.head)):
        np.testing.assert_array_equal(got, want)
    assert resumed.ff_history["loss"] == full.ff_history["loss"]
