"""experiments/refit_head.py: the converged head fitted on a saved run gives what the trainer's
own read-out gives, and --into saves it as a run the figure scripts read."""
import importlib.util
import json
import os

import numpy as np

import ff_hybrid_mnist as ff
from conftest import TINY, TINY_NO_HEAD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "refit_head", os.path.join(ROOT, "experiments", "refit_head.py"))
refit_head = importlib.util.module_from_spec(spec)
spec.loader.exec_module(refit_head)


def test_refit_into_a_folder_is_the_trainers_own_converged_read_out(tmp_path, capsys):
    flags = ["--n-epochs", "1", "--val-size", "300"]
    assert ff.main(TINY + flags + ["--out", str(tmp_path / "sgd")]) == 0
    assert ff.main(TINY_NO_HEAD + flags + ["--out", str(tmp_path / "direct")]) == 0
    capsys.readouterr()
    into = tmp_path / "refit"
    assert refit_head.main(["--run", str(tmp_path / "sgd"), "--into", str(into),
                            "--out", str(tmp_path / "r.jsonl")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    direct, refit = ff.load_run(str(tmp_path / "direct")), ff.load_run(str(into))
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
