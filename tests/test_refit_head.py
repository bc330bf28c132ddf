"""experiments/refit_head.py: the converged head fitted on a saved run gives what the trainer's
own read-out gives, and --into saves it as a run the figure scripts read."""
import importlib.util
import json
import os

import numpy as np

import ff_hybrid_mnist as ff
from conftest import CONVERGED_FLAGS, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "refit_head", os.path.join(ROOT, "experiments", "refit_head.py"))
refit_head = importlib.util.module_from_spec(spec)
spec.loader.exec_module(refit_head)


def test_refit_into_a_folder_is_the_trainers_own_converged_read_out(converged_run, tmp_path,
                                                                  capsys):
    # the same network read out by SGD, then refitted: the converged run's head exactly
    assert ff.main(TINY + CONVERGED_FLAGS + ["--out", str(tmp_path / "sgd")]) == 0
    capsys.readouterr()
    into = tmp_path / "refit"
    assert refit_head.main(["--run", str(tmp_path / "sgd"), "--into", str(into),
                            "--out", str(tmp_path / "r.jsonl")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct, refit = ff.load_run(converged_run[0]), ff.load_run(str(into))
    for a, b in zip(direct.head, refit.head):
        np.testing.assert_array_equal(a, b)
    for key in ("val_error", "test_error", "train_error", "head_weight_decay"):
        assert refit.metrics[key] == direct.metrics[key] == record.get(key, refit.metrics[key])
    assert refit.cfg.head == "lbfgs" and refit.softmax_history["kind"] == "lbfgs"
    assert json.loads((tmp_path / "r.jsonl").read_text())["test_error"] == record["test_error"]


def test_refit_into_a_folder_that_holds_something_is_refused_before_fitting(tmp_path, capsys):
    assert ff.main(TINY + ["--n-epochs", "1", "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert refit_head.main(["--run", str(tmp_path / "run"), "--into", str(tmp_path / "busy")]) == 2
    assert "is not empty" in capsys.readouterr().err
