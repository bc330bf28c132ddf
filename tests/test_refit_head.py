"""experiments/analyses/refit_head.py: the converged head fitted on a saved run gives what
the trainer's own read-out gives, and --into saves it as a run the figure scripts read."""
import json

import numpy as np

import ff_hybrid_mnist as ff
import ff_label_mnist as ff_label
import ff_runs
from conftest import CONVERGED_FLAGS, TINY
from experiments.analyses import refit_head


def test_refit_into_a_folder_is_the_trainers_own_converged_read_out(converged_run, tmp_path,
                                                                  capsys):
    # the same network read out by SGD, then refitted: the converged run's head exactly
    assert ff.main(TINY + CONVERGED_FLAGS + ["--out", str(tmp_path / "sgd")]) == 0
    capsys.readouterr()
    into = tmp_path / "refit"
    assert refit_head.main(["--run", str(tmp_path / "sgd"), "--into", str(into),
                            "--out", str(tmp_path / "r.jsonl")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct, refit = ff_runs.load_run(converged_run[0]), ff_runs.load_run(str(into))
    for a, b in zip(direct.head, refit.head):
        np.testing.assert_array_equal(a, b)
    for key in ("val_error", "test_error", "train_error", "head_weight_decay"):
        assert refit.metrics[key] == direct.metrics[key] == record.get(key, refit.metrics[key])
    assert refit.cfg.head == "lbfgs" and refit.softmax_history["kind"] == "lbfgs"
    assert json.loads((tmp_path / "r.jsonl").read_text())["test_error"] == record["test_error"]
    # the record names the script of the run it refits, with that run's configuration
    assert record["script"] == "experiments/analyses/refit_head.py"
    assert record["run_config"]["script"] == "ff_hybrid_mnist.py"
    assert ff_runs.run_config(record["run_config"]) == ff_runs.load_run(str(tmp_path / "sgd")).cfg


def test_refit_of_a_label_run_is_its_own_head_and_names_its_script(tmp_path, capsys):
    """A run of ff_label_mnist.py: its head reads the digits with the neutral label, so the
    SGD head refitted with the run's own settings is the run's own head exactly."""
    run_dir = tmp_path / "label"
    assert ff_label.main(TINY + ["--n-epochs", "1", "--val-size", "300",
                                 "--out", str(run_dir)]) == 0
    capsys.readouterr()
    assert refit_head.main(["--run", str(run_dir), "--head", "sgd", "--softmax-epochs", "2",
                            "--into", str(tmp_path / "refit")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run, refit = ff_runs.load_run(str(run_dir)), ff_runs.load_run(str(tmp_path / "refit"))
    for a, b in zip(run.head, refit.head):
        np.testing.assert_array_equal(a, b)
    for key in ("val_error", "test_error", "train_error"):
        assert record[key] == run.metrics[key]
    assert record["run_config"]["script"] == "ff_label_mnist.py"
    assert ff_runs.run_config(record["run_config"]) == run.cfg
    assert isinstance(refit.cfg, ff_label.LabelConfig) and refit.cfg == run.cfg
    assert refit.metrics["goodness_test_error"] == run.metrics["goodness_test_error"]


def test_refit_into_a_folder_that_holds_something_is_refused_before_fitting(tmp_path, capsys):
    assert ff.main(TINY + ["--n-epochs", "1", "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert refit_head.main(["--run", str(tmp_path / "run"), "--into", str(tmp_path / "busy")]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_a_run_in_progress_is_read_out_from_its_checkpoint(converged_run, tmp_path, capsys):
    """--run may name a folder holding only a checkpoint (a run still training): its
    network after the epochs done, the same read-out as the finished run's network gives."""
    import shutil
    (tmp_path / "going").mkdir()
    shutil.copy(f"{converged_run[0]}/checkpoint.npz", tmp_path / "going")
    capsys.readouterr()
    records = []
    for run in (converged_run[0], str(tmp_path / "going")):
        assert refit_head.main(["--run", run, "--head", "sgd", "--softmax-epochs", "1"]) == 0
        records.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    for key in ("val_error", "test_error", "train_error", "ff_epochs"):
        assert records[0][key] == records[1][key]
    assert records[1]["run"].endswith("going") and records[1]["ff_epochs"] == 1
