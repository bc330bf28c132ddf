"""The training CLI end to end on a tiny subset of the embedded real MNIST: artefacts, reload,
bad flags, determinism, resume, divergence."""
import os

import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
import ff_runs
from conftest import QUIET, TINY, TINY_NO_HEAD, StopTraining



def run_tiny(out, *extra):
    assert ff.main(TINY + ["--n-epochs", "2", "--out", str(out), *extra]) == 0
    return ff_runs.load_run(str(out))


def test_end_to_end_artefacts_and_reload(tmp_path, capsys):
    run = run_tiny(tmp_path / "run")
    printed = capsys.readouterr().out
    assert "epoch   2/2" in printed and "eta" in printed and "test error" in printed
    for name in ("model.npz", "history.json", "metrics.json", "checkpoint.npz"):
        assert (tmp_path / "run" / name).is_file()
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".tmp")]
    assert run.cfg.layer_sizes == (784, 40, 30, 20) and len(run.weights) == 3
    assert len(run.ff_history["loss"]) == 2 and len(run.softmax_history["train_error"]) == 2
    assert "test_error" not in run.softmax_history  # the test set is read once, at the end
    assert {"python", "numpy", "cpu"} <= set(run.environment)
    assert len(run.metrics["real_vs_hybrid_accuracy"]) == 3
    # the stored test error is reproduced from the saved weights alone
    _, _, x_test, y_test = ff.load_mnist()
    F = ff.extract_features(run.weights, run.biases, x_test, run.cfg.top_k)
    assert ff.error_rate(F, y_test, *run.head) == run.metrics["test_error"]
    assert run.metrics["test_error"] < 0.9  # better than chance after a few epochs


@pytest.mark.parametrize("flags, words", [
    (["--layer-sizes", "785,10"], "784"),
    (["--layer-sizes", "784,0,10"], "at least 1"),
    (["--layer-sizes", "784,a"], "integers"),
    (["--batch-size", "0"], ">= 1"),
    (["--n-epochs", "-1"], ">= 0"),
    (["--n-train", "60001"], "60000"),
    (["--threshold", "0"], "> 0"),
    (["--lr", "-0.1"], "> 0"),
    (["--lr", "nan"], "must be a finite number"),
    (["--lr", "1e400"], "must be a finite number"),
    (["--seed", "100000000000000000000000000"], "below 2^63"),
    (["--n-epochs", "100000000000000000000000000"], "below 2^63"),
    (["--top-k", "5"], "exceeds"),
    (["--goodness", "max"], "is not one of"),
])
def test_bad_flags_exit_2(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        ff_runs.parse_args(flags)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def strip_timing(metrics):
    return {k: v for k, v in metrics.items() if "seconds" not in k and k not in ("peak_rss_mib", "run_dir")}


def test_same_seed_same_numbers(tmp_path):
    a, b = run_tiny(tmp_path / "a"), run_tiny(tmp_path / "b")
    c = run_tiny(tmp_path / "c", "--seed", "1")
    assert strip_timing(a.metrics) == strip_timing(b.metrics)
    for Wa, Wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(Wa, Wb)
    assert not np.array_equal(a.weights[0], c.weights[0])


RECIPE = ["--hard-negatives", "--hard-from", "head", "--optimizer", "sgd",
          "--normalize", "rms", "--init", "fan-in", "--goodness", "sum", "--threshold", "1",
          "--peer-kind", "author", "--lr", "0.005", "--weight-decay", "0.002",
          "--lr-decay", "linear-half-epochs", "--hard-head-weight-decay", "0.003"]


def cut_after_one_epoch(out, flags, config_class):
    """Start the run of `flags` (config_class's script) in folder `out` and stop it after its
    first FF epoch, the way a kill would (checkpoint kept)."""
    def stop(epoch, state):
        raise StopTraining
    args = ff_runs.parse_args(flags + ["--out", str(out)], ff_runs.build_parser(config_class))
    with pytest.raises(StopTraining):
        ff_runs.run_experiment(args, callback=stop, **QUIET)


@pytest.mark.parametrize("script, extra", [(ff, []), (ff_label, RECIPE)],
                         ids=["hybrid", "recipe"])  # Adam; SGD + head
def test_resume_ends_with_the_same_numbers(tmp_path, script, extra):
    """A run stopped after epoch 1 and resumed (without --n-epochs: to the run's own) ends with
    the uninterrupted run's weights, history and metrics, bit for bit: the checkpoint holds
    the optimiser states, peer means, the hard-negative head and the generator."""
    config_class = ff_label.LabelConfig if script is ff_label else ff.FFConfig
    flags = TINY + ["--n-epochs", "3", "--lr-decay", "linear-half", "--peer-norm", "0.1"] + extra
    assert script.main(flags + ["--out", str(tmp_path / "full")]) == 0
    cut_after_one_epoch(tmp_path / "cut", flags, config_class)
    cfg, state = ff_runs.load_checkpoint(str(tmp_path / "cut"))
    assert type(cfg) is config_class and state.epochs_done == 1
    assert (state.head is not None) == (script is ff_label)  # the recipe's hard-negative head
    assert script.main(["--resume", str(tmp_path / "cut")]) == 0
    full, resumed = ff_runs.load_run(str(tmp_path / "full")), ff_runs.load_run(str(tmp_path / "cut"))
    assert type(resumed.cfg) is config_class and resumed.cfg.n_epochs == 3
    for W1, W2 in zip(full.weights, resumed.weights):
        np.testing.assert_array_equal(W1, W2)
    assert resumed.ff_history["loss"] == full.ff_history["loss"]
    assert strip_timing(resumed.metrics) == strip_timing(full.metrics)


def test_checkpoint_every_k_epochs_and_after_the_last(tmp_path):
    """--checkpoint-every 2 over 3 epochs: no checkpoint after epoch 1, then after 2 and 3;
    the time spent writing them is reported."""
    written = []

    def seen(epoch, state):
        path = tmp_path / "run" / "checkpoint.npz"
        written.append(ff_runs.read_checkpoint_config(str(tmp_path / "run"))[1]
                       if path.exists() else None)
    args = ff_runs.parse_args(TINY_NO_HEAD + ["--n-epochs", "3", "--softmax-epochs", "0",
                                 "--checkpoint-every", "2", "--out", str(tmp_path / "run")])
    metrics = ff_runs.run_experiment(args, callback=seen, log=lambda *a, **k: None).metrics
    assert written == [None, 2, 3]
    assert metrics["checkpoint_seconds"] > 0


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    run_tiny(tmp_path / "run")
    assert ff.main(TINY + ["--n-epochs", "1", "--out", str(tmp_path / "run")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_divergence_stops_with_epoch_and_layer(tmp_path, monkeypatch, capsys):
    real = ff.ff_loss_and_dz

    def poisoned(h, *args, **kw):
        loss, g = real(h, *args, **kw)
        return (np.nan if h.shape[1] == 30 else loss), g

    monkeypatch.setattr(ff, "ff_loss_and_dz", poisoned)
    assert ff.main(TINY + ["--n-epochs", "2", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "epoch 1" in err and "layer 2" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_greedy_schedule_trains_one_layer_at_a_time(tmp_path):
    run = run_tiny(tmp_path / "g", "--schedule", "greedy")
    loss = run.ff_history["loss"]
    assert len(loss) == 6
    assert loss[0][1] is None and loss[1][2] is None and loss[2][2] is None
    # stage 3: only layer 3 learns; the frozen layers below still report their accuracy
    assert loss[5][:2] == [None, None] and loss[5][2] is not None
    assert all(a is not None for a in run.ff_history["accuracy"][5])
    assert run.metrics["ff_epochs"] == 6


CONVERGED = [a for a in TINY if a not in ("--head", "sgd")]  # the default read-out


def test_the_default_read_out_is_the_converged_head(converged_run):
    out, printed = converged_run
    assert "chosen on the validation split" in printed
    run = ff_runs.load_run(out)
    assert run.cfg.head == "lbfgs" and run.softmax_history["kind"] == "lbfgs"
    assert run.metrics["head_C"] in ff.HEAD_C
    fits = run.softmax_history["fits"]
    assert [f["C"] for f in fits] == sorted(ff.HEAD_C)
    best = min(fits, key=lambda f: (f["choice_error"], f["C"]))
    assert best["C"] == run.metrics["head_C"]
    assert best["weight_decay"] == run.metrics["head_weight_decay"] == 1 / (best["C"] * 600)
    assert run.metrics["val_error"] == best["choice_error"]
    # the stored head is the optimum of the module's own loss at the chosen penalty
    x_train, y_train, _, _ = ff.load_mnist()
    n = run.cfg.n_train  # the head's digits: the first n (the validation split is at the end)
    F = ff.extract_features(run.weights, run.biases, x_train[:n], run.cfg.top_k)
    _, dW, db, _ = ff.softmax_loss_and_grads(F, y_train[:n], *run.head,
                                             run.metrics["head_weight_decay"])
    chosen = [f for f in fits if f["C"] == run.metrics["head_C"]][0]
    grad_max = max(np.abs(dW).max(), np.abs(db).max())
    # every fit converged (the float32 ones finished in float64 where rounding stopped them);
    # the head, stored in float32, is as near the optimum as float32 can hold it
    assert run.metrics["head_converged"] and all(f["converged"] for f in fits)
    assert chosen["grad_max"] <= ff.HEAD_GTOL and grad_max <= 1e-4


def test_sgd_head_settings_without_the_sgd_head_are_refused(capsys):
    for flags in (["--softmax-lr", "2"], ["--softmax-weight-decay", "0.001"]):
        with pytest.raises(SystemExit) as e:
            ff.main(CONVERGED + flags + ["--dry-run"])
        assert e.value.code == 2 and "needs --head sgd" in capsys.readouterr().err


def test_a_run_saved_before_the_converged_head_reads_as_an_sgd_head_run():
    raw = ff_runs.asdict(ff.FFConfig(head="sgd", softmax_lr=2.0))
    del raw["head"]
    cfg = ff_runs.run_config(raw)
    assert cfg.head == "sgd" and cfg.softmax_lr == 2.0
