"""The experiment scripts: the threshold and blur plots read sweep records, and the
goodness read-out errors match the run's own (the sweep runner: tests/test_sweep.py)."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import plot_threshold_sweep  # noqa: E402
from conftest import TINY_LINE  # noqa: E402


def test_pairs_keeps_flag_values_together():
    assert plot_threshold_sweep.pairs(["--n-blur", "2", "--refresh-inputs", "--lr", "0.1"]) == [
        ("--n-blur", "2"), ("--refresh-inputs", None), ("--lr", "0.1")]


def test_blur_plot_reads_sweep_records(tmp_path, capsys):
    import plot_blur_sweep
    results = tmp_path / "r.jsonl"
    with open(results, "w") as f:
        for n, val in ((2, 0.05), (6, 0.04), (10, 0.06)):
            f.write(json.dumps({"label": f"b{n}", "rc": 0, "args": [
                "--layer-sizes", "784,50,50", "--n-blur", str(n), "--val-size", "100"],
                "metrics": {"val_error": val, "test_error": val + 0.01,
                            "real_vs_hybrid_accuracy": [0.9, 0.8]}}) + "\n")
        f.write(json.dumps({"label": "failed", "rc": 1, "args": []}) + "\n")
    plot_blur_sweep.main([str(results), "--out", str(tmp_path / "b.png")])
    printed = capsys.readouterr().out
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "n_blur  6: val error 4.00%  test error 5.00%" in printed


def test_goodness_errors_match_the_runs_own_read_out(tmp_path, capsys):
    """Its test and validation errors are the ones the run wrote (same split, same layers);
    a hybrid run is refused with exit status 2."""
    import ff_hybrid_mnist as ff
    import goodness_errors
    flags = TINY_LINE.split() + ["--negatives", "label", "--val-size", "200", "--goodness",
                                 "sum", "--threshold", "1"]
    assert ff.main(flags + ["--out", str(tmp_path / "label")]) == 0
    capsys.readouterr()
    assert goodness_errors.main(["--run", str(tmp_path / "label")]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = json.load(open(tmp_path / "label" / "metrics.json"))
    assert out["goodness_test_error"] == saved["goodness_test_error"]
    assert out["goodness_val_error"] == saved["goodness_val_error"]
    run = ff.load_run(str(tmp_path / "label"))
    x_train, y_train, _, _ = ff.load_mnist()
    x_fit, y_fit, _, _ = ff.split_validation(x_train, y_train, 200, 300)
    scores = ff.goodness_per_label(run.weights, run.biases, x_fit, "sum", 2)
    assert out["goodness_train_error"] == np.mean(scores.argmax(1) != y_fit)
    assert ff.main(TINY_LINE.split() + ["--out", str(tmp_path / "hybrid")]) == 0
    assert goodness_errors.main(["--run", str(tmp_path / "hybrid")]) == 2


def test_ff_generalisation_measures_each_split_with_the_frozen_weights(tmp_path, capsys):
    """Its per-layer FF loss and accuracy are the run's objective, recomputed in float64,
    on the training digits the run fitted and on its validation digits; a run without
    validation digits is refused with exit status 2."""
    import ff_hybrid_mnist as ff
    import ff_generalisation
    run_dir = str(tmp_path / "hybrid")
    assert ff.main(TINY_LINE.split() + ["--val-size", "200", "--out", run_dir]) == 0
    capsys.readouterr()
    assert ff_generalisation.main(["--run", run_dir, "--n", "150", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = ff.load_run(run_dir)
    x_train, y_train, _, _ = ff.load_mnist()
    x_fit, _, x_val, _ = ff.split_validation(x_train, y_train, 200, run.cfg.n_train)
    for name, x in (("train", x_fit), ("val", x_val)):
        real, hybrids = ff.evaluation_set(x, 150, np.random.default_rng(3), run.cfg.n_blur)
        hs = ff.network_activities(run.weights, run.biases, np.concatenate([real, hybrids]))
        for l, h in enumerate(hs):
            g = (h.astype(np.float64) ** 2).mean(axis=1)
            t = run.cfg.threshold
            loss = (np.logaddexp(0, t - g[:150]).sum() + np.logaddexp(0, g[150:] - t).sum()) / 150
            accuracy = ((g[:150] > t).mean() + (g[150:] < t).mean()) / 2
            assert np.isclose(out[f"{name}_ff_loss"][l], loss, rtol=1e-4)
            assert abs(out[f"{name}_real_vs_hybrid_accuracy"][l] - accuracy) <= 1 / 150
    assert out["ff_epochs"] == run.cfg.n_epochs
    assert out["train_ff_loss"] != out["val_ff_loss"]
    assert ff.main(TINY_LINE.split() + ["--out", str(tmp_path / "noval")]) == 0
    assert ff_generalisation.main(["--run", str(tmp_path / "noval")]) == 2
