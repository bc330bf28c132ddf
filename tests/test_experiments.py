"""The experiment scripts: the threshold and blur plots read sweep records, and the
goodness read-out errors match the run's own (the sweep runner: tests/test_sweep.py); each
script refuses unusable flags, output paths and records in one line before it computes
anything (docs/reliability.md, "Experiment scripts")."""
import json
import os
import sys

import numpy as np
import pytest

from experiments.baselines import backprop_baseline as bp
from experiments.data_movement import data_movement as dm
from experiments.sweeps import plot_blur_sweep, plot_threshold_sweep, summarize
from conftest import TINY_LINE, one_line

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "results")


def test_pairs_keeps_flag_values_together():
    assert plot_threshold_sweep.pairs(["--n-blur", "2", "--refresh-inputs", "--lr", "0.1"]) == [
        ("--n-blur", "2"), ("--refresh-inputs", None), ("--lr", "0.1")]


def test_blur_plot_reads_sweep_records(tmp_path, capsys):
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
    """Its test and validation errors are the ones the run of ff_label_mnist.py wrote (same
    split, same layers); a run of another script is refused with exit status 2, naming it."""
    import ff_hybrid_mnist as ff
    import ff_label_mnist as ff_label
    import ff_runs
    from experiments.analyses import goodness_errors
    flags = TINY_LINE.split() + ["--val-size", "200", "--goodness", "sum", "--threshold", "1"]
    assert ff_label.main(flags + ["--out", str(tmp_path / "label")]) == 0
    capsys.readouterr()
    assert goodness_errors.main(["--run", str(tmp_path / "label")]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = json.load(open(tmp_path / "label" / "metrics.json"))
    assert out["goodness_test_error"] == saved["goodness_test_error"]
    assert out["goodness_val_error"] == saved["goodness_val_error"]
    run = ff_runs.load_run(str(tmp_path / "label"))
    x_train, y_train, _, _ = ff.load_mnist()
    x_fit, y_fit, _, _ = ff.split_validation(x_train, y_train, 200, 300)
    scores = ff_label.goodness_per_label(run.weights, run.biases, x_fit, "sum", 2)
    assert out["goodness_train_error"] == np.mean(scores.argmax(1) != y_fit)
    assert ff.main(TINY_LINE.split() + ["--out", str(tmp_path / "hybrid")]) == 0
    capsys.readouterr()
    assert goodness_errors.main(["--run", str(tmp_path / "hybrid")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "made by ff_hybrid_mnist.py" in err and "ff_label_mnist.py" in err


def test_ff_generalisation_measures_each_split_with_the_frozen_weights(tmp_path, capsys):
    """Its per-layer FF loss and accuracy are the run's objective, recomputed in float64,
    on the training digits the run fitted and on its validation digits; a run without
    validation digits, or without hybrids (ff_label_mnist.py's), is refused with exit
    status 2."""
    import ff_hybrid_mnist as ff
    import ff_label_mnist as ff_label
    import ff_runs
    import visualize_ff_hybrid_mnist as viz
    from experiments.analyses import ff_generalisation
    run_dir = str(tmp_path / "hybrid")
    assert ff.main(TINY_LINE.split() + ["--val-size", "200", "--out", run_dir]) == 0
    capsys.readouterr()
    assert ff_generalisation.main(["--run", run_dir, "--n", "150", "--seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = ff_runs.load_run(run_dir)
    x_train, y_train, _, _ = ff.load_mnist()
    x_fit, _, x_val, _ = ff.split_validation(x_train, y_train, 200, run.cfg.n_train)
    for name, x in (("train", x_fit), ("val", x_val)):
        real, hybrids = viz.evaluation_set(x, 150, np.random.default_rng(3), run.cfg.n_blur)
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
    label = str(tmp_path / "label")
    assert ff_label.main(TINY_LINE.split() + ["--val-size", "200", "--out", label]) == 0
    capsys.readouterr()
    assert ff_generalisation.main(["--run", label]) == 2
    assert "made by ff_label_mnist.py" in one_line(capsys.readouterr().err)


# -- refusals before anything is computed ----------------------------------------------------

def never(*args, **kwargs):
    raise AssertionError("computed before the flags and paths were checked")


@pytest.mark.parametrize("out, says", [
    ("no/x.jsonl", "the folder"), (".", "is a folder"), ("afile/x.jsonl", "which is a file")])
def test_backprop_baseline_checks_out_before_training(tmp_path, monkeypatch, capsys, out, says):
    """A folder that does not exist lost the record after the whole training."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(bp.ff, "load_mnist", never)
    with pytest.raises(SystemExit) as e:
        bp.main(["--out", str(tmp_path / out)])
    assert e.value.code == 2 and says in one_line(capsys.readouterr().err)


def test_backprop_baseline_prints_a_record_it_cannot_append(tmp_path, capsys):
    assert bp.append_record(str(tmp_path / "gone" / "x.jsonl"), '{"label": "a"}') == 1
    out, err = capsys.readouterr()
    assert out == '{"label": "a"}\n' and "printed above" in one_line(err)


@pytest.fixture
def no_computing(monkeypatch):
    """data_movement with every subcommand's work replaced by a failure."""
    for name in ("run_grid", "run_steps", "run_batch", "run_curves", "run_to_error",
                 "run_plot", "run_tables"):
        monkeypatch.setattr(dm, name, never)


@pytest.mark.parametrize("args, says", [
    (["grid", "--out", "no/g.json"], "the folder"),
    (["steps", "--out", "."], "is a folder"),
    (["curves", "--widths", "0", "--out", "c.json"], "--widths: 0 must be >= 1"),
    (["curves", "--seeds", "-1", "--out", "c.json"], "--seeds: -1 must be >= 0"),
    (["curves", "--seeds", "1", "1", "--out", "c.json"], "--seeds 1 1 repeats a value"),
    (["to-error", "--schedules", "s", "--curves", "c", "--targets", "6", "--out", "c.json"],
     "6 is above 1"),
    (["curves", "--ff-lrs", "0.1", "0.1", "--out", "c.json"], "--ff-lrs 0.1 0.1 repeats"),
    (["curves", "--bp-lrs", "0", "--out", "c.json"], "--bp-lrs: 0 must be > 0"),
    (["plot", "--grid", "g", "--out", "p.pgn"], "give a file name ending in"),
    (["batch", "--widths", "64", "64", "--out", "b.jsonl"], "--widths 64 64 repeats a value"),
    (["batch", "--batch", "0", "--out", "b.jsonl"], "--batch: 0 must be >= 1"),
    (["batch", "--out", "no/b.jsonl"], "the folder"),
])
def test_data_movement_refuses_flags_and_outputs_before_computing(tmp_path, monkeypatch, capsys,
                                                                  no_computing, args, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        dm.main(args)
    assert e.value.code == 2 and says in one_line(capsys.readouterr().err)


def test_data_movement_batch_appends_one_record_per_width(tmp_path, monkeypatch):
    """The batch subcommand at a tiny size (9 inputs instead of 784): one JSON line per
    width, appended, with the costs that measure() gives and the command that made it."""
    small = {name: getattr(dm, name) for name in ("trace_ff_step", "trace_backprop_step")}
    for name, trace in small.items():
        monkeypatch.setattr(dm, name, lambda n_in, *a, _t=trace, **k: _t(9, *a, **k))
    out = tmp_path / "b.jsonl"
    out.write_text('{"earlier": 1}\n')
    monkeypatch.setattr(sys, "argv", ["data_movement.py", "batch", "--widths", "2", "3",
                                      "--batch", "2", "--out", str(out)])
    assert dm.main(sys.argv[1:]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"earlier": 1} and [r["width"] for r in lines[1:]] == [2, 3]
    for r in lines[1:]:
        ff = dm.measure(small["trace_ff_step"](9, (r["width"],) * 2, 2, negatives=True))
        bp_ = dm.measure(small["trace_backprop_step"](9, (r["width"],) * 2, 2))
        assert (r["ff"]["cost"], r["backprop"]["cost"]) == (ff["cost"], bp_["cost"])
        assert r["ratio"] == ff["cost"] / bp_["cost"] and r["batch"] == 2
        assert r["script"] == "experiments/data_movement/data_movement.py"
        assert r["command"].startswith(
            "python3 -m experiments.data_movement.data_movement batch --widths 2 3")


@pytest.mark.parametrize("args, says", [
    (["plot", "--grid", "missing.json", "--out", "p.png"], "missing.json: cannot be read"),
    (["plot", "--grid", os.path.join(RESULTS, "data-movement-steps.json"), "--out", "p.png"],
     "not the record of `data_movement.py grid` (no base)"),
    (["tables", "--grid", "latin1.json"], "latin1.json:2: not UTF-8 text"),
    (["to-error", "--curves", os.path.join(RESULTS, "data-movement.json"), "--schedules",
      "s.jsonl", "--targets", "0.1", "--out", "c.json"],
     "not the record of `data_movement.py curves` (no settings)"),
])
def test_data_movement_refuses_unusable_records_before_computing(tmp_path, monkeypatch, capsys,
                                                                 no_computing, args, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.json").write_bytes(b'{\n"what": "caf\xe9"}')
    assert dm.main(args) == 1
    assert says in one_line(capsys.readouterr().err)


def sweep_record(label, args=(), rc=0, **metrics):
    metrics = {"val_error": 0.05, "test_error": 0.06, "ff_seconds": 10.0,
               "real_vs_hybrid_accuracy": [0.9, 0.8], **metrics}
    return {"label": label, "args": list(args), "rc": rc, "status": "finished",
            "metrics": metrics}


def write_records(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("line, says", [
    (b'{"label": "b", "rc": "0"}', 'rc is "0", not an integer or null'),
    (json.dumps(sweep_record("b", test_error="six")).encode(),
     'metrics.test_error is "six", not a number or null'),
    (json.dumps(sweep_record("b", args=["--lr", 3])).encode(), "args[1] is 3, not a string"),
    (json.dumps({**sweep_record("b"), "metrics": {"test_error": 0.1}}).encode(),
     "no metrics.ff_seconds"),
    (json.dumps({"label": "b"}).encode(), "no rc"),
    (b'{"label": "caf\xe9", "rc": 0}', "not UTF-8 text (byte 0xe9)"),
])
def test_summarize_names_the_file_and_line_of_a_bad_record(tmp_path, capsys, line, says):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(sweep_record("a")).encode() + b"\n" + line + b"\n")
    assert summarize.main([str(path)]) == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {path}:2: ") and says in err


def test_summarize_counts_a_label_recorded_twice_once(tmp_path, capsys):
    """The last record of a label is used: a re-run or extended run is not a second seed."""
    first = write_records(tmp_path / "a.jsonl", sweep_record("x-s0", ["--seed", "0"]),
                          sweep_record("x-s1", ["--seed", "1"], val_error=0.07))
    again = write_records(tmp_path / "b.jsonl", sweep_record("x-s0", ["--seed", "0"],
                                                             val_error=0.03))
    assert summarize.main([first, again]) == 0
    out, err = capsys.readouterr()
    assert "| x, seeds 1/0 | **5.00 +- 2.83%**" in out and out.count("| x-s0 |") == 1
    assert f"label x-s0 is recorded more than once ({first}:1, {again}:1); only {again}:1" in err


def test_a_run_recorded_as_interrupted_then_finished_is_one_run(tmp_path, capsys):
    path = write_records(tmp_path / "r.jsonl", sweep_record("x-s0", rc=None),
                         sweep_record("x-s0"), sweep_record("x-s1", ["--seed", "1"]),
                         sweep_record("x-s1", ["--seed", "1"], rc=1))
    assert summarize.main([path]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "| x, seeds 0/1 |" in out and "failed" not in out


@pytest.mark.parametrize("second, says", [
    (sweep_record("x-s1", ["--seed", "1", "--lr", "0.1"]),
     "differ in --lr 0.03 vs 0.1, not in --seed alone"),
    (sweep_record("x-s1", ["--lr", "0.03", "--seed", "0"]), ":2 are both --seed 0"),
])
def test_summarize_gives_no_mean_of_two_experiments(tmp_path, capsys, second, says):
    path = write_records(tmp_path / "r.jsonl", sweep_record("x-s0", ["--lr", "0.03"]), second)
    assert summarize.main([path]) == 0
    out, err = capsys.readouterr()
    assert "seeds" not in out and f"warning: seed group x: {path}:1" in err and says in err


THRESHOLD_BASE = ["--layer-sizes", "784,500,500,500,500", "--n-epochs", "10", "--val-size",
                  "10000"]


@pytest.mark.parametrize("plot, records, says", [
    (plot_blur_sweep, [sweep_record(f"th{t}", THRESHOLD_BASE + ["--threshold", str(t)])
                       for t in (2, 4)], "differ in --threshold 2 vs 4, not in --n-blur alone"),
    (plot_blur_sweep, [sweep_record(f"b{n}", ["--n-blur", "4"]) for n in (1, 2)],
     "are both --n-blur 4"),
    (plot_blur_sweep, [sweep_record(f"b{n}", ["--n-blur", str(n)], real_vs_hybrid_accuracy=None)
                       for n in (2, 4)], "not a hybrid-negative run"),
    (plot_threshold_sweep, [sweep_record(f"b{n}", THRESHOLD_BASE + ["--n-blur", str(n)])
                            for n in (2, 4)], "not the records of a threshold sweep"),
    (plot_threshold_sweep, [sweep_record(f"th{n}", THRESHOLD_BASE + ["--threshold", "2"])
                            for n in (1, 2)], "are both --threshold 2.0"),
    (plot_threshold_sweep, [sweep_record("th2", THRESHOLD_BASE + ["--threshold", "2"]),
                            sweep_record("th4", THRESHOLD_BASE + ["--threshold", "4",
                                                                  "--softmax-lr", "1"])],
     "differ in --softmax-lr not given vs 1, not in --threshold alone"),
])
def test_plots_refuse_the_records_of_another_sweep(tmp_path, capsys, plot, records, says):
    """One line saying which records the plot reads; nothing drawn or printed."""
    path = write_records(tmp_path / "r.jsonl", *records)
    assert plot.main([path, "--out", str(tmp_path / "p.png")]) == 1
    out, err = capsys.readouterr()
    assert says in one_line(err) and plot.EXPECTS in err and out == ""
    assert not (tmp_path / "p.png").exists()
