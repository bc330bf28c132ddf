"""The experiment scripts: the sweep runner records what each run measured, and refuses
configuration files it would misread."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import plot_threshold_sweep  # noqa: E402
import sweep  # noqa: E402

TINY = "--layer-sizes 784,30,20 --n-epochs 1 --n-train 300 --batch-size 50 --softmax-epochs 2 --top-k 1"


def test_sweep_records_each_run_and_its_refit(tmp_path):
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"# two tiny runs\n\na {TINY}\nb {TINY} --threshold 8\n")
    results = tmp_path / "r.jsonl"
    sweep.main([str(cfg), "--jobs", "2", "--threads", "1", "--refit-top-k", "2",
                "--out-dir", str(tmp_path / "runs"), "--results", str(results)])
    records = {r["label"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert set(records) == {"a", "b"}
    for label, r in records.items():
        assert r["rc"] == 0 and r["refit_rc"] == 0 and r["refit_top_k"] == 2
        saved = json.load(open(tmp_path / "runs" / label / "metrics.json"))
        assert r["metrics"]["test_error"] == saved["test_error"]
        assert 0 <= r["refit_test_error"] <= 1
    assert json.load(open(tmp_path / "runs" / "b" / "args.json"))["threshold"] == 8
    table = plot_threshold_sweep.markdown_table(list(records.values()))
    assert "`--layer-sizes 784,30,20" in table and "--threshold 8" in table


@pytest.mark.parametrize("text", ["a --out x\n", "a --lr 0.1\na --lr 0.2\n", "a --resume x\n"])
def test_sweep_refuses_out_resume_and_repeated_labels(tmp_path, text):
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(text)
    with pytest.raises(ValueError):
        sweep.read_configs(str(cfg))


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


def test_sweep_resume_goes_on_from_the_checkpoint_and_skips_recorded_runs(tmp_path, capsys):
    """A run cut after its first epoch, continued by `sweep --resume`, ends with the numbers
    of an uninterrupted run; running the sweep again leaves the recorded runs alone."""
    out, results = tmp_path / "runs", tmp_path / "r.jsonl"
    flags = TINY.split() + ["--n-epochs", "2"]
    first = tmp_path / "first.txt"
    first.write_text(f"cut {TINY}\n")  # 1 epoch, checkpointed, BLAS threads as below
    sweep.main([str(first), "--threads", "1", "--out-dir", str(out),
                "--results", str(tmp_path / "first.jsonl")])
    for name in ("metrics.json", "model.npz"):  # as if killed before the end
        os.remove(out / "cut" / name)
    cfg = tmp_path / "cfg.txt"
    cfg.write_text(f"base {' '.join(flags)}\ncut\nfull\n")
    argv = [str(cfg), "--threads", "1", "--resume", "--out-dir", str(out), "--results", str(results)]
    assert sweep.main(argv[:1] + ["--dry-run"] + argv[1:]) == 0
    sweep.main(argv)
    records = {r["label"]: r for r in map(json.loads, results.read_text().splitlines())}
    assert records["cut"]["resumed"] and not records["full"]["resumed"]
    assert records["cut"]["metrics"]["ff_loss"] == records["full"]["metrics"]["ff_loss"]
    assert records["cut"]["metrics"]["test_error"] == records["full"]["metrics"]["test_error"]
    log = (out / "cut.log").read_text()  # the first sitting's lines are kept
    assert "epoch   1/1" in log and "resuming" in log
    capsys.readouterr()
    sweep.main(argv)
    assert len(results.read_text().splitlines()) == 2
    assert capsys.readouterr().out.count("finished earlier") == 2


def test_goodness_errors_match_the_runs_own_read_out(tmp_path, capsys):
    """Its test and validation errors are the ones the run wrote (same split, same layers);
    a hybrid run is refused with exit status 2."""
    import ff_hybrid_mnist as ff
    import goodness_errors
    flags = TINY.split() + ["--negatives", "label", "--val-size", "200", "--goodness", "sum",
                            "--threshold", "1"]
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
    assert ff.main(TINY.split() + ["--out", str(tmp_path / "hybrid")]) == 0
    assert goodness_errors.main(["--run", str(tmp_path / "hybrid")]) == 2
